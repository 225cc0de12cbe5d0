"""lm-evaluation-harness adapter: a consolidated checkpoint as an ``lm_eval`` model named ``hybrid-pretrain``.

Importing this module registers the class, so ``lm_eval.simple_evaluate(model="hybrid-pretrain",
model_args="path=ckpt/X", tasks=[...])`` works (``launcher/eval_harness.py`` is the CLI). Built on
``TemplateLM``, which turns (context, continuation) strings into token ids the way every harness
model does (trailing context spaces move into the continuation; an empty context is conditioned on
``prefix_token_id``, our EOS, which precedes every document in training, and ``tok_encode`` starts
every context with it too); this class only scores token ids, rolls long documents into windows,
and decodes greedily or by sampling.

Scores are summed natural-log probabilities from full-sequence forwards in fp32 (or --dtype).
Batches are padded on the right, which a causal model never sees. Dropless MoE layers (the default) route
each token on its own, so scores do not depend on batch mates; with capacity-limited experts
(``moe_dropless=false``) the batch mates can change which tokens are dropped: use ``batch_size=1`` for
per-request-exact MoE scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.generation import Sampling, generate
from hybrid_pretrain.training.weights import build_model, load_weights

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
NAME = "hybrid-pretrain"


@register_model(NAME)
class HybridPretrainLM(TemplateLM):
    """The project's model (any model.arch with ``forward(ids) -> logits``) over a convert_checkpoint.py folder.

    model_args: ``path`` (required), ``device`` (cpu, cuda, ...), ``dtype`` (fp32 | bf16), ``batch_size``,
    ``max_length`` (context window; default the config's data.seq_len), ``max_gen_toks`` (default 256),
    ``trust_checkpoint`` (unpickle anything a run directory's files hold; default only tensors).
    """

    def __init__(self, path: str, device: str | None = None, dtype: str = "fp32", batch_size: int | str = 8,
                 max_length: int | str = 0, max_gen_toks: int | str = 256, trust_checkpoint: bool | str = False,
                 **unused) -> None:
        super().__init__()

        weights = load_weights(path, trust=str(trust_checkpoint).lower() in ("1", "true", "yes"))
        if weights.tokenizer is None:
            raise ConfigError(f"{path} has no tokenizer.model; expected the checkpoint's tokenizer beside its weights")
        if str(dtype) not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
        self.tokenizer = weights.tokenizer
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_model(weights, self._device, DTYPES[str(dtype)])
        # "auto" (the harness's batch-size search) is not supported: take our default instead of guessing.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length) or weights.config.data.seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.checkpoint = str(path)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"sentencepiece-{self.tokenizer.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """SentencePiece ids, after an EOS unless ``add_special_tokens`` is False: in training every document
        follows an EOS, so a context starts the way documents did."""
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.eot_token_id, *ids]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request.

        The context is cut from the left to ``max_length`` tokens of input in all.
        """
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for batch in collator.get_batched(n=self.batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in batch]  # model inputs
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: causal positions never see it
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
            logprobs = F.log_softmax(self.model(ids.to(self.device)).float(), dim=-1)  # (B, L, V)
            for i, (key, _, cont) in enumerate(batch):
                n = len(cont)
                picked = logprobs[i, len(rows[i]) - n: len(rows[i])]  # (n, V): the positions predicting cont
                target = torch.tensor(cont, device=picked.device)
                answer = (float(picked.gather(1, target[:, None]).sum()), bool((picked.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string (EOS-conditioned), in disjoint windows of ``max_length`` tokens."""
        results = []
        for (string,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = self.tok_encode(string, add_special_tokens=False)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (greedy unless ``do_sample``) and cut the text at the first ``until`` string."""

        results = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = Sampling(temperature=float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0,
                                top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            out = generate(self.model, torch.tensor([prompt], device=self.device), max_new, sampling,
                           eos_id=self.eot_token_id, pad_id=self.eot_token_id)
            new = out[0, len(prompt):].tolist()
            if self.eot_token_id in new:
                new = new[: new.index(self.eot_token_id)]
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results
