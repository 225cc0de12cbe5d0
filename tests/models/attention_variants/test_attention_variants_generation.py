"""Generation through prefill + step with the three recurrent-capable mixers equals greedy decoding by forward."""

from __future__ import annotations

import torch

from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.models.generation import generate


def test_greedy_generate_equals_forward_argmax(make_cfg) -> None:
    options = {"bigbird": {"block": 16}, "block_recurrent": {"block_len": 16, "num_states": 4},
               "linear_attention": {"chunk_size": 8}}
    model = build_arch(make_cfg(layers="LBR", rotary_dim=4, max_seq_len=64, options=options)).eval()
    prompt = torch.randint(0, 64, (2, 13))
    out = generate(model, prompt, max_new_tokens=30)
    ids = prompt
    with torch.no_grad():
        for _ in range(30):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.equal(ids)
