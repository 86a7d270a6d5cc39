# mapbuild submission kernel: installs the bundle's wheels (onnxruntime; bitsandbytes for nf4 members), checks the
# environment, then runs the bundle's runtime offline and writes submission.csv. Any fault in the environment stops
# here with one line.
import glob, hashlib, json, os, subprocess, sys, tempfile

DATASET_ID = "$dataset_id"
INPUT = "/kaggle/input"
WORKING = "/kaggle/working"


def manifest_of(path):
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    ours = isinstance(m, dict) and m.get("format") == "$bundle_format" and m.get("dataset_id") == DATASET_ID
    return m if ours else None


# Kaggle has mounted datasets at INPUT/<slug> and at INPUT/datasets/<owner>/<slug>: search.
found = [(p, m) for p in sorted(glob.glob(f"{INPUT}/**/manifest.json", recursive=True)) for m in [manifest_of(p)] if m]
if not found:
    raise SystemExit(f"mapbuild: dataset {DATASET_ID} is not attached: add it to this notebook's inputs")
if len(found) > 1:  # two versions attached: sort order must not pick the models
    raise SystemExit(f"mapbuild: dataset {DATASET_ID} is attached {len(found)} times ({found[0][0]} and {found[1][0]}): keep one in this notebook's inputs")
bundle, manifest = os.path.dirname(found[0][0]), found[0][1]
# Python imports the runtime from a folder that holds nothing else (-P keeps the working folder off sys.path too),
# so no file at the bundle's root can shadow an installed module. It holds copies of the bytes checked here, and
# no __pycache__: a .pyc in the bundle, which no hash covers, would run instead of its checked source.
code = tempfile.mkdtemp(prefix="mapbuild-")
os.mkdir(os.path.join(code, "runtime"))
for name, digest in manifest["files"].items():
    if name.startswith("runtime/") and name.endswith(".py") and "/" not in name[len("runtime/"):]:
        with open(os.path.join(bundle, name), "rb") as f:
            source = f.read()
        if hashlib.sha256(source).hexdigest() != digest:
            raise SystemExit(f"mapbuild: {name} differs from the manifest's sha256; package the bundle again")
        with open(os.path.join(code, name), "wb") as f:
            f.write(source)
env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
python = f"{sys.version_info.major}.{sys.version_info.minor}"

# onnxruntime is not in Kaggle's image: install the bundle's wheel for this interpreter, offline. A bundle whose
# members all run on PyTorch, which the image has, brings none.
wheels = manifest.get("wheels") or []
pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", os.path.join(bundle, "wheels")]
ort = [w for w in wheels if w.get("python") != "any"]
if ort:
    wheel = next((w for w in ort if w.get("python") == python), None)
    if wheel is None:
        have = ", ".join(w["file"] for w in ort)
        raise SystemExit(f"mapbuild: the bundle has no onnxruntime-gpu wheel for Python {python} (it holds {have}); package it again with --python {python}")
    # onnxruntime and onnxruntime-gpu share one module: never both in one environment
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "onnxruntime"], capture_output=True)
    done = subprocess.run([*pip, f"{wheel['name']}=={wheel['version']}"], capture_output=True, text=True)
    if done.returncode:
        why = [line for line in done.stderr.splitlines() if line.strip()] or ["no output"]
        raise SystemExit(f"mapbuild: pip could not install {wheel['file']}: {why[-1].strip()}")
# A wheel for every Python (bitsandbytes, for nf4 members): one that does not install costs only the members that
# need it, which the runtime then skips in one line each.
for extra in (w for w in wheels if w.get("python") == "any"):
    done = subprocess.run([*pip, f"{extra['name']}=={extra['version']}"], capture_output=True, text=True)
    if done.returncode:
        why = [line for line in done.stderr.splitlines() if line.strip()] or ["no output"]
        print(f"mapbuild: pip could not install {extra['file']} ({why[-1].strip()}); the members that need it will be skipped", file=sys.stderr)

# onnxruntime imports and has CUDA when a GPU is visible (where a member runs on it), and the competition's test.csv
# is found; else one line.
check = subprocess.run([sys.executable, "-P", "-m", "runtime.preflight", "--bundle", bundle, "--input-root", INPUT], cwd=bundle, env=env, capture_output=True, text=True)
if check.returncode:
    why = [line for line in check.stderr.splitlines() if line.strip()] or ["no output"]
    raise SystemExit(f"mapbuild: {why[-1].strip().removeprefix('error: ')}")
test = check.stdout.strip()

run = [sys.executable, "-P", "-m", "runtime.submit", "--bundle", bundle, "--test", test, "--out", os.path.join(WORKING, "submission.csv"),
       "--input-root", INPUT,  # where a member's base model is attached
       "--result", os.path.join(WORKING, "mapbuild_result.json")]  # what ran and every fallback, for a person or `mapbuild verify`
done = subprocess.run(run, cwd=bundle, env=env)
if done.returncode:
    raise SystemExit(f"mapbuild: the runtime stopped (exit {done.returncode}); its last line above says why")
