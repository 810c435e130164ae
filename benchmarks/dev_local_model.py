"""Model selection for the local span ranker on a dev split carved from the TRAINING articles.

Features and hyperparameters are chosen here, never on data/squad/validation.json: 6 of the 35 training articles
(prepare's split by article, seed 0) are held out as dev; the model trains on the other 29 exactly as the trainer
does (same idf, same Adam steps, best epoch by val_loss on the first 300 dev questions) and is scored on all dev
questions, with an error analysis:

    PYTHONPATH=. python benchmarks/dev_local_model.py     # dev F1/EM, per question type, error breakdown (~30 s)
    PYTHONPATH=. python benchmarks/dev_local_model.py --epochs 4 --learning-rate 0.002 --show 20
    PYTHONPATH=<another tree> python benchmarks/dev_local_model.py   # that tree's model and settings
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import finetune_mlflow
from finetune_mlflow.config import load_config
from finetune_mlflow.preparation import write_splits
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.providers.local import span_features, span_model
from finetune_mlflow.providers.local.span_corpus import build_corpus
from finetune_mlflow.providers.local.trainer import featurize_rows, idf_of
from finetune_mlflow.squad_metrics import best_over_golds

REPO = Path(__file__).resolve().parents[1]
# The settings of the tree being imported, so that `PYTHONPATH=<another tree>` measures that tree as it was.
EXPERIMENT = Path(finetune_mlflow.__file__).resolve().parents[1] / "experiments" / "squad_local.yaml"
DEV_FRACTION = 0.17  # 6 of the 35 training articles


def dev_split() -> tuple[list[dict], list[dict]]:
    """prepare's own split by article of train.json alone (validation.json is never read here)."""
    config = load_config(str(EXPERIMENT), {"train_data": str(REPO / "data" / "squad" / "train.json")})
    # An empty override means "keep the YAML's" to load_config, hence replace(): no validation file, split train.
    config = replace(config, data=replace(config.data, validation_data="", validation_fraction=DEV_FRACTION))
    with tempfile.TemporaryDirectory(prefix="dev-split-") as folder:
        write_splits(config, Path(folder))
        return read_jsonl(Path(folder) / "train.jsonl"), read_jsonl(Path(folder) / "validation.jsonl")


def fit(rows: list[dict], dev: list[dict], args) -> tuple[span_model.Weights, dict, dict]:
    """Train like the trainer: best epoch by val_loss on the first 300 dev questions."""
    size = args.max_span_tokens
    idf = idf_of(rows)
    train, _ = featurize_rows(rows, idf, size)
    val, _ = featurize_rows(dev, idf, size, limit=300)
    best, info = None, {}
    for report, w in span_model.train(train, val, span_model.initial_weights(size), epochs=args.epochs,
                                      learning_rate=args.learning_rate, batch_size=args.batch_size, seed=0,
                                      eval_every_steps=10**9, max_span_tokens=size, **_options(args)):
        if report.epoch_end and (best is None or report.val_loss <= info["val_loss"]):
            best, info = w.copy(), {"epoch": report.epoch + 1, "val_loss": report.val_loss}
    return best, idf, info


def _options(args) -> dict:
    """Only the options given, so the script also runs against an older tree."""
    return {k: v for k, v in (("l2", args.l2), ("average_every", args.average_every)) if v}


def predictions(rows: list[dict], idf: dict, w: span_model.Weights, size: int) -> list[dict]:
    """Per question: predicted text, predicted and gold token spans, sentences, type."""
    passages, pairs, index = [], [], {}
    for row in rows:
        if row["context"] not in index:
            index[row["context"]] = len(passages)
            passages.append(span_features.passage(row["context"]))
        k = index[row["context"]]
        pairs.append((k, span_features.question(row["question"], passages[k], idf, row["answers"], size)))
    best = span_model.predict_spans(build_corpus(passages, pairs), w, size)
    out = []
    for row, (k, q), span in zip(rows, pairs, best):
        p = passages[k]
        text = "" if span is None else p.text[p.offsets[span[0], 0]: p.offsets[span[1], 1]]
        em, f1 = best_over_golds(text, row["answers"])
        qtype = span_model.QUESTION_TYPES[span_features.question_type(row["question"])]
        out.append({"row": row, "text": text, "em": em, "f1": f1, "qtype": qtype, "span": span, "gold": q.gold,
                    "sentence": p.sentence})
    return out


def analyse(results: list[dict]) -> None:
    groups = defaultdict(list)
    for r in results:
        groups["type " + r["qtype"]].append(r)
        if not len(r["gold"]):
            groups["error: gold not a candidate span"].append(r)
            continue
        gold_sentences = {int(r["sentence"][g[0]]) for g in r["gold"]}
        right_sentence = r["span"] is not None and int(r["sentence"][r["span"][0]]) in gold_sentences
        groups["sentence " + ("right" if right_sentence else "wrong")].append(r)
        if right_sentence and r["em"] < 1:
            overlap = any(r["span"][0] <= g[1] and g[0] <= r["span"][1] for g in r["gold"])
            groups["error: right sentence, " + ("overlaps gold" if overlap else "disjoint")].append(r)
        length = int(min(g[1] - g[0] for g in r["gold"])) + 1
        groups[f"gold length {min(length, 5)}{'+' if length >= 5 else ''}"].append(r)
    print(f"{'group':<34} {'n':>5} {'F1':>6} {'EM':>6}")
    for name in sorted(groups):
        g = groups[name]
        print(f"{name:<34} {len(g):>5} {100 * np.mean([r['f1'] for r in g]):6.1f} "
              f"{100 * np.mean([r['em'] for r in g]):6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config = load_config(str(EXPERIMENT))
    parser.add_argument("--epochs", type=int, default=config.tune.epochs)
    parser.add_argument("--learning-rate", type=float, default=config.tune.learning_rate)
    parser.add_argument("--batch-size", type=int, default=config.tune.batch_size)
    parser.add_argument("--max-span-tokens", type=int, default=config.local.max_span_tokens)
    parser.add_argument("--l2", type=float, default=None)
    parser.add_argument("--average-every", type=int, default=getattr(config.local, "average_every_steps", 0))
    parser.add_argument("--show", type=int, default=0, help="print this many wrong dev answers")
    args = parser.parse_args()
    train, dev = dev_split()
    print(f"train {len(train)} questions, dev {len(dev)} ({len({r['title'] for r in dev})} articles: "
          f"{', '.join(sorted({r['title'] for r in dev}))})")
    started = time.process_time()
    with threadpool_limits(limits=1):
        w, idf, info = fit(train, dev, args)
        results = predictions(dev, idf, w, args.max_span_tokens)
    print(f"best epoch {info['epoch']} (dev val_loss {info['val_loss']:.4f}); "
          f"{time.process_time() - started:.1f} s CPU")
    print(f"dev F1 {100 * np.mean([r['f1'] for r in results]):.2f} EM {100 * np.mean([r['em'] for r in results]):.2f}")
    analyse(results)
    rng = np.random.default_rng(0)
    wrong = [r for r in results if r["f1"] < 1]
    for k in sorted(rng.choice(len(wrong), min(args.show, len(wrong)), replace=False)):
        r = wrong[k]
        print(f"- [{r['qtype']}] {r['row']['question']} | predicted {r['text']!r} | gold {r['row']['answers'][:2]}")


if __name__ == "__main__":
    main()
