"""How fast an RLAIF-V-like parquet becomes the hf_preference dataset (read + full image
decode, then the TFDS array_record build), in rows per second.

    python bench/hf_preference_build.py --rows 500 --image-size 448 --out runs/bench_hfpref

Writes one parquet with RLAIF-V's schema (image struct<bytes, path> holding a JPEG, question,
chosen, rejected, ...) under --out, then times (a) `read_preference_lists` over it (every
image decoded completely, nothing written) and (b) `build_hf_preference` into a fresh data
dir (what `perpo-jax prepare-data` / the first `train` does). Prints ONE JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, however run
from timing import log, machine_info  # noqa: E402

from perpo_jax.data.hf_preference import (PreferenceColumns, build_hf_preference,  # noqa: E402
                                          read_preference_lists)

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random picture (upsampled noise), JPEG quality 90: photo-like sizes."""
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_parquet(path: Path, rows: int, size: int) -> int:
    rng = np.random.default_rng(0)
    records = [{"ds_name": "RLAIF-V", "image": {"bytes": _jpeg(rng, size), "path": f"{i}.jpg"},
                "question": f"Describe picture {i} in detail.",
                "chosen": "A detailed and faithful description. " * 8,
                "rejected": "A description with a hallucinated object. " * 8,
                "origin_dataset": "bench", "origin_split": "{}", "idx": str(i),
                "image_path": f"{i}.jpg"} for i in range(rows)]
    schema = pa.schema([("ds_name", pa.string()), ("image", IMAGE_STRUCT),
                        ("question", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("origin_dataset", pa.string()),
                        ("origin_split", pa.string()), ("idx", pa.string()),
                        ("image_path", pa.string())])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path.stat().st_size


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=500, help="rows in the parquet")
    p.add_argument("--image-size", type=int, default=448, help="square image side (pixels)")
    p.add_argument("--out", default="runs/bench_hfpref", help="scratch folder (replaced)")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    parquet = out / "rlaif_v_like.parquet"
    log(f"writing {args.rows} rows")
    size = write_parquet(parquet, args.rows, args.image_size)

    log("reading (full decode)")
    start = time.perf_counter()
    count = sum(1 for _ in read_preference_lists([str(parquet)], PreferenceColumns(), None))
    read_s = time.perf_counter() - start

    log("building the TFDS dataset")
    start = time.perf_counter()
    builder, _ = build_hf_preference(str(out / "data"), [str(parquet)], None,
                                     PreferenceColumns(), name="bench")
    build_s = time.perf_counter() - start
    assert count == args.rows == len(builder.as_data_source()["train"])
    report = {"rows": args.rows, "image_size": args.image_size,
              "parquet_mib": round(size / 2**20, 2),
              "read_decode_s": round(read_s, 3), "read_rows_per_s": round(count / read_s, 1),
              "build_s": round(build_s, 3), "build_rows_per_s": round(count / build_s, 1),
              "machine": machine_info()}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
