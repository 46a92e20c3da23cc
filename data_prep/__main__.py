"""Command line: ``python -m data_prep {generate,tsv,convert-criteo,convert-avazu,table,info} ...``."""

from __future__ import annotations

import argparse
import json
import sys

from .convert import DEFAULT_MAX_MALFORMED, convert_avazu, convert_criteo
from .generator import PRESETS, generate_dataset, generate_tsv
from .meta import is_disk_full, load_meta


def _info(path: str) -> dict:
    meta = load_meta(path)
    mal = meta.raw["manifest"]["malformed"]
    return {
        "path": str(meta.path), "source": meta.source, "protocol": meta.protocol,
        "split_rows": meta.split_rows, "positive_rate": meta.positive_rate, "bayes_auc": meta.bayes_auc,
        "num_dense": meta.num_dense, "num_categorical": len(meta.categorical_features),
        "num_embeddings": meta.num_embeddings, "malformed": {"count": mal["count"], "by_kind": mal["by_kind"]},
        "shards": len(meta.raw["manifest"]["shards"]),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the command line; returns the new dataset's summary (also printed as JSON)."""
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a dataset directory from a preset")
    g.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--workers", type=int, default=2)
    t = sub.add_parser("tsv", help="write a preset's rows as Criteo train.txt text (.gz to compress)")
    t.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=None)
    for name, helptext in (("convert-criteo", "convert Criteo Kaggle train.txt or 1TB day files"),
                           ("convert-avazu", "convert the Avazu train CSV")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("inputs", nargs="+" if name == "convert-criteo" else 1)
        c.add_argument("--out", required=True)
        c.add_argument("--protocol", choices=["dlrm", "random"], default="dlrm" if name == "convert-criteo" else "random")
        c.add_argument("--min-count", type=int, default=None)
        c.add_argument("--strict", action="store_true", help="stop at the first malformed row")
        c.add_argument("--max-malformed", type=float, default=DEFAULT_MAX_MALFORMED, metavar="FRACTION",
                       help="largest fraction of malformed lines accepted (skipped and counted)")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--workers", type=int, default=2)
        c.add_argument("--chunk-mb", type=float, default=32)
        if name == "convert-criteo":
            c.add_argument("--layout", choices=["auto", "kaggle", "1tb"], default="auto")
    from .table import add_table_arguments

    add_table_arguments(sub.add_parser("table", help="convert parquet / CSV files of any schema"))
    i = sub.add_parser("info", help="summarize a dataset directory")
    i.add_argument("path")
    a = p.parse_args(argv)
    if a.cmd == "generate":
        path = generate_dataset(a.preset, a.out, seed=a.seed, workers=a.workers)
    elif a.cmd == "tsv":
        out = generate_tsv(a.preset, a.out, seed=a.seed)
        result = {"path": str(out), "rows": PRESETS[a.preset].num_rows}
        print(json.dumps(result, indent=1))
        return result
    elif a.cmd == "table":
        from .table import prepare_table_from_args

        path = prepare_table_from_args(a)
    elif a.cmd == "info":
        path = a.path
    else:
        kw = dict(protocol=a.protocol, min_count=a.min_count, strict=a.strict, seed=a.seed, workers=a.workers,
                  chunk_bytes=int(a.chunk_mb * (1 << 20)), max_malformed=a.max_malformed)
        if a.cmd == "convert-criteo":
            path = convert_criteo(a.inputs, a.out, layout=a.layout, **kw)
        else:
            path = convert_avazu(a.inputs[0], a.out, **kw)
    result = _info(path)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if not is_disk_full(e):
            raise
        print(f"error: the disk is full (or a file size limit was hit) writing {e.filename or 'a file'}: "
              f"{e.strerror or e}; free some space and run the same command again: it resumes", file=sys.stderr)
        sys.exit(1)
