"""What happens to Atlas's retriever between index refreshes on the fact-lookup task (issue 22).

Runs `synthetic.atlas_facts.train_setting` unchanged and, at every evaluation, also measures against a
*fresh* index (every passage re-embedded with the current passage tower, exact search), next to the
model's own retrieval from the stale index:

- gold recall@K stale vs fresh, the gold passage's mean rank in both;
- the gold passage's score q.p/sqrt(d) with its stale vs fresh embedding, and the best stale/fresh score;
- the query-independent part of the scores ("prior": the mean over test queries of each passage's score),
  as a share of the score variance over passages, and how many distinct passages fill all top K;
- recall@K with the query's shared part removed (each query minus the mean test query);
- passage drift since the last refresh: mean cos(stale, fresh) per passage, the share of the drift that
  is one shared shift (|mean delta|^2 / mean |delta|^2), and 20-30 steps after a refresh the drift left when
  one parameter group of the passage tower is put back to its refresh-time weights;
- during training: how often the K passages the retriever loss sees hold the gold passage.

    python bench/atlas_staleness.py --config configs/debug_atlas_facts.yaml train.eval_every=10 \
        model.options.atlas.query_side_only=false [key=value ...]

One JSON line per evaluation on stdout; the history and the probe's rows go to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from hybrid_pretrain.base.typed_config import build, deep_merge, parse_override, read_yaml
from hybrid_pretrain.synthetic import atlas_facts
from hybrid_pretrain.synthetic.atlas_facts import FactsRun, prepare


@torch.no_grad()
def embed_all(model, tokens: torch.Tensor, mask: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Every store row through the current passage tower (eval mode) -> (R, D)."""
    tower = model.passage_tower
    was = tower.training
    tower.eval()
    out = torch.cat([tower(tokens[i : i + batch], mask[i : i + batch]) for i in range(0, len(tokens), batch)])
    tower.train(was)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/debug_atlas_facts.yaml", help="YAML file of the run")
    parser.add_argument("--setting", default="pdist", help="retriever loss to train (pdist, emdr2, loop, adist)")
    parser.add_argument("--out", default="runs/atlas_staleness.json", help="where the history and probe rows go")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. train.eval_every=10")
    args = parser.parse_args(argv)
    values = read_yaml(args.config)
    for text in args.overrides:
        values = deep_merge(values, parse_override(text))
    run = build(FactsRun, values, source=args.config)
    run.settings = [args.setting]
    run.validate()
    torch.set_num_threads(run.threads or 1)
    prep = prepare(run, progress=False)
    tokens, mask = prep.passages
    store_ids = np.asarray(prep.store.ids)
    query_len = atlas_facts.Atlas(atlas_facts.model_config(run, prep.tokenizer.vocab_size, args.setting)).opts.query_len
    queries = prep.train[0][:, :query_len]
    gold_of_query = {tuple(x.tolist()): g for x, g in zip(queries, store_ids[prep.train_gold_rows])}
    state = {"stale": None, "train_hits": [], "model": None}
    rows = []

    real_build = atlas_facts.build_model

    def build_model(run_, prep_, setting):
        model = real_build(run_, prep_, setting)
        state["model"] = model
        real_retrieve = model.retrieve

        def retrieve(query):
            found = real_retrieve(query)
            if model.training and model.learn_retriever:
                gold = np.array([gold_of_query.get(tuple(q.tolist()), -1) for q in query])
                state["train_hits"].append(float((found.ids == gold[:, None]).any(1).mean()))
            return found

        model.retrieve = retrieve
        return model

    class Retrieval(atlas_facts.TrainingRetrieval):
        def _build(self, why):
            super()._build(why)
            state["stale"] = embed_all(self.model, tokens, mask)

        def after_step(self, step):
            super().after_step(step)
            if self.refresher.due(step):
                state["stale"] = embed_all(self.model, tokens, mask)
                state["weights"] = copy.deepcopy(self.model.passage_tower.state_dict())

    real_evaluate = atlas_facts.evaluate
    evals = {"n": 0}

    def step_of(model):
        return run.train.eval_every * (evals["n"] - 1)

    def evaluate(model, inputs, labels, gold, batch_size=64):
        out = real_evaluate(model, inputs, labels, gold, batch_size)
        evals["n"] += 1
        out["step"] = step_of(model)
        Lq = model.opts.query_len
        with torch.no_grad():
            was = model.training
            model.eval()
            q = model.retriever(inputs[:, :Lq], model.query_mask(inputs[:, :Lq]))  # (M, D)
            model.train(was)
        fresh, stale = embed_all(model, tokens, mask), state["stale"]
        scale = q.shape[1] ** 0.5
        g_rows = torch.from_numpy(prep.store.rows_of(gold))
        for name, E in (("stale", stale), ("fresh", fresh)):
            s = q @ E.T / scale  # (M, R)
            g = s.gather(1, g_rows[:, None])  # (M, 1)
            rank = (s > g).sum(1).float()
            out[f"{name}_recall@4"] = float((rank < 4).float().mean())
            out[f"{name}_gold_rank"] = float(rank.median())
            out[f"{name}_gold_score"] = float(g.mean())
            out[f"{name}_top_score"] = float(s.max(1).values.mean())
            out[f"{name}_mean_score"] = float(s.mean())
            out[f"{name}_distinct_top1"] = int(s.argmax(1).unique().numel())
        qc = q - q.mean(0)  # the query-specific part only: its shared part times stale passages is a prior
        for name, E in (("stale", stale), ("fresh", fresh)):
            s = qc @ E.T
            g = s.gather(1, g_rows[:, None])
            out[f"{name}_centred_q_recall@4"] = float(((s > g).sum(1) < 4).float().mean())
            s = q @ E.T
            prior = s.mean(0, keepdim=True)  # (1, R) the query-independent part of every passage's score
            out[f"{name}_prior_share"] = float(prior.var() / s.var(1).mean())
            out[f"{name}_distinct_top4"] = int(s.topk(4, dim=1).indices.unique().numel())
        delta = fresh - stale
        if state.get("weights") is not None and step_of(model) % run.retrieval.refresh_every in (20, 30):
            tower = model.passage_tower
            now = copy.deepcopy(tower.state_dict())
            for group in ("embed.", "pos.", "blocks.0.", "blocks.1.", "norm."):
                tower.load_state_dict({k: (state["weights"][k] if k.startswith(group) else v) for k, v in now.items()})
                back = embed_all(model, tokens, mask) - stale
                left = back.pow(2).sum(1).mean() / delta.pow(2).sum(1).mean()
                out[f"drift_left_reverting_{group[:-1]}"] = float(left)
            tower.load_state_dict(now)
        out["drift_cos"] = float(torch.nn.functional.cosine_similarity(stale, fresh, dim=1).mean())
        out["drift_shared"] = float(delta.mean(0).pow(2).sum() / delta.pow(2).sum(1).mean())
        out["mean_p_norm_ratio"] = float(fresh.mean(0).norm() / fresh.norm(dim=1).mean())
        out["q_cos_mean_p"] = float(torch.nn.functional.cosine_similarity(q, fresh.mean(0)[None], dim=1).mean())
        hits = state["train_hits"]
        out["train_gold_in_topk"] = float(np.mean(hits)) if hits else float("nan")
        state["train_hits"] = []
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
        rows.append(out)
        return out

    atlas_facts.build_model, atlas_facts.TrainingRetrieval, atlas_facts.evaluate = build_model, Retrieval, evaluate
    result = atlas_facts.train_setting(run, prep, args.setting, progress=False, log=lambda m: None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"history": result["history"], "probe": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
