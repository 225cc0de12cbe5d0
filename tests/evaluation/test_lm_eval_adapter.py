"""evaluation/lm_eval_adapter.py: the harness's scores are the project model's own log-probabilities, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer
from hybrid_pretrain.evaluation.lm_eval_adapter import HybridPretrainLM
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.roles import IGNORE_INDEX
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.weights import RunWeights, save_consolidated

TEXT = ["the cat sat on the mat. the dog sat on the log. a bird flew over the house and the tree.",
        "one two three four five six seven eight nine ten. red green blue yellow black white."] * 20
QUESTIONS = [("the cat sat on the", [" mat", " sky", " tree"], 0), ("one two three four", [" blue", " five"], 1),
             ("red green blue", [" yellow", " dog", " seven"], 0), ("a bird flew over the", [" nine", " house"], 1)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A consolidated checkpoint as convert_checkpoint.py writes it: tiny H3 + attention model with a real tokenizer."""
    root = tmp_path_factory.mktemp("lm_eval")
    tok = Tokenizer(train_tokenizer(TEXT, root / "tok", vocab_size=320, sample_bytes=1 << 20, log=lambda m: None))
    cfg = load_config(None, [f"run_dir={root / 'run'}", "model.layers=HA", "model.d_model=32", "model.n_heads=2",
                             "model.h3_d_state=8", "data.seq_len=64", f"data.vocab_size={tok.vocab_size}"])
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    return save_consolidated(RunWeights(cfg, model.state_dict(), tok, "step00000001"), root / "ckpt")


def _reference_logprob(lm: HybridPretrainLM, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens) from the model's own loss on one unpadded sequence (EOS + text)."""
    tok = lm.tokenizer
    ctx = [tok.eos_id, *tok.encode(context)]
    whole = [tok.eos_id, *tok.encode(context + continuation)]
    ids = torch.tensor([whole])
    labels = ids[:, 1:].clone()
    labels[:, : len(ctx) - 1] = IGNORE_INDEX  # only the continuation's tokens are scored
    n = len(whole) - len(ctx)
    with torch.no_grad():
        return -float(lm.model(ids[:, :-1], labels=labels)) * n


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_equals_the_models_summed_token_log_probs(ckpt) -> None:
    lm = HybridPretrainLM(str(ckpt), device="cpu", batch_size=3)  # 9 requests of different lengths: padded batches
    pairs = [(q, c) for q, choices, _ in QUESTIONS for c in choices]
    scores = lm.loglikelihood(_requests("loglikelihood", pairs))
    assert len(scores) == len(pairs)
    for (context, continuation), (score, greedy) in zip(pairs, scores):
        assert isinstance(greedy, bool)
        assert score == pytest.approx(_reference_logprob(lm, context, continuation), rel=1e-5, abs=1e-5)
    # Batch size does not change a dense model's scores.
    single = HybridPretrainLM(str(ckpt), device="cpu", batch_size=1).loglikelihood(_requests("loglikelihood", pairs))
    torch.testing.assert_close(torch.tensor([s for s, _ in single]), torch.tensor([s for s, _ in scores]),
                               rtol=1e-5, atol=1e-5)


def test_rolling_loglikelihood_scores_every_token_once(ckpt) -> None:
    lm = HybridPretrainLM(str(ckpt), device="cpu")
    text = "the dog sat on the log."
    (whole,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert whole == pytest.approx(_reference_logprob(lm, "", text), rel=1e-5, abs=1e-5)
    # Windows shorter than the text: each token still scored once, with less context, so a finite, different sum.
    short = HybridPretrainLM(str(ckpt), device="cpu", max_length=4)
    (windowed,) = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert torch.isfinite(torch.tensor(windowed)) and windowed != pytest.approx(whole, abs=1e-6)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(ckpt) -> None:
    from hybrid_pretrain.models.generation import generate

    lm = HybridPretrainLM(str(ckpt), device="cpu")
    prompt = [lm.tokenizer.eos_id, *lm.tokenizer.encode("the cat")]
    out = generate(lm.model, torch.tensor([prompt]), 12, eos_id=lm.tokenizer.eos_id, pad_id=lm.tokenizer.eos_id)
    new = out[0, len(prompt):].tolist()
    full = lm.tokenizer.decode(new[: new.index(lm.tokenizer.eos_id)] if lm.tokenizer.eos_id in new else new)
    assert full
    stop = full[len(full) // 2:][:2]  # a stop string that occurs in the text
    (free, cut) = lm.generate_until(_requests("generate_until", [("the cat", {"until": [], "max_gen_toks": 12}),
                                                                ("the cat", {"until": [stop], "max_gen_toks": 12})]))
    assert free == full and cut == full[: full.index(stop)]


def _task_dir(root: Path) -> Path:
    """A local multiple-choice task: JSONL data read by the datasets json builder, no download."""
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    data = tasks / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


def test_harness_accuracy_on_a_local_task_matches_our_own_scoring(ckpt, tmp_path, monkeypatch, capsys) -> None:
    from hybrid_pretrain.launcher import eval_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = _task_dir(tmp_path)
    code = eval_harness.main([str(ckpt), "--tasks", "tiny_mc", "--include-path", str(tasks), "--device", "cpu",
                              "--output", str(tmp_path / "full.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]["tiny_mc"]
    lm = HybridPretrainLM(str(ckpt), device="cpu")
    correct = [max(range(len(c)), key=lambda i: _reference_logprob(lm, q, c[i])) == a for q, c, a in QUESTIONS]
    assert result["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert (tmp_path / "full.json").is_file()


def test_cli_help_and_unknown_task_is_one_line(ckpt, tmp_path, capsys) -> None:
    from hybrid_pretrain.launcher import eval_harness

    with pytest.raises(SystemExit) as exit_info:
        eval_harness.main(["--help"])
    assert exit_info.value.code == 0 and "--include-path" in capsys.readouterr().out
    tasks = _task_dir(tmp_path)
    assert eval_harness.main([str(ckpt), "--tasks", "nope", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --tasks: no task named 'nope'")

