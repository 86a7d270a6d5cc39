"""`mapbuild cv`: every fold, the union of out-of-fold rows, ensemble weights per recipe, the full refit."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from builder.cli import cli
from builder.ensemble import fit
from builder.folds import assign_folds, load_labelled
from builder.package import package
from runtime.data import read_rows
from runtime.errors import MapbuildError
from runtime.manifest import load_manifest
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, rewrite_record, run_kernel
from .test_cli import assert_one_line_error

pytestmark = pytest.mark.slow  # five tiny trainings and exports in one fixture


@pytest.fixture(scope="module")
def cv_root(tiny_bert, tmp_path_factory):
    """Folds 0 and 1 of a tiny BERT and a TF-IDF recipe on the sample, then fold 2 added, then the full refits."""
    root = tmp_path_factory.mktemp("cv")
    config = root / "cv.toml"
    config.write_text(
        f'dataset_id = "me/tiny-cv"\nout = "out"\nwheels = false\n'
        f'[[models]]\nname = "bert"\nmodel = "{tiny_bert}"\ndata = "{SAMPLE_TRAIN}"\nfolds = 3\nepochs = 2\nlora_r = 2\nlearning_rate = 3e-3\nquantize = "fp32"\n'
        f'[[models]]\nname = "words"\nkind = "tfidf"\ndata = "{SAMPLE_TRAIN}"\nfolds = 3\nmin_df = 1\n'
    )
    first = CliRunner().invoke(cli, ["cv", str(config), "--folds", "0,1"])
    assert first.exit_code == 0, first.output
    stamp = (root / "out" / "bert" / "fold0" / "onnx" / "model.onnx").stat().st_mtime_ns
    more = CliRunner().invoke(cli, ["cv", str(config), "--full", "--json"])
    assert more.exit_code == 0, more.output
    return {"root": root / "out", "config": config, "first": first.output, "more": more.output, "more_json": more.stdout, "stamp": stamp}


def test_cv_reports_folds_and_adds_missing_ones_without_redoing_finished_ones(cv_root):
    root = cv_root["root"]
    assert "bert             folds 0,1: MAP@3" in cv_root["first"] and "words            folds 0,1: MAP@3" in cv_root["first"]
    assert cv_root["more"].count("done before, kept") == 4 and "bert, fold 2: train" in cv_root["more"]
    assert json.loads(cv_root["more_json"])["recipes"]["bert"]["folds"] == [0, 1, 2]  # the Trainer printed its loss lines: to stderr
    assert (root / "bert" / "fold0" / "onnx" / "model.onnx").stat().st_mtime_ns == cv_root["stamp"]
    report = json.loads((root / "cv.json").read_text())
    df = load_labelled(str(SAMPLE_TRAIN))
    for name in ("bert", "words"):
        r = report["recipes"][name]
        assert r["folds"] == [0, 1, 2] and r["rows"] == len(df) and len(r["fold_map3"]) == 3
        assert r["mean"] == pytest.approx(np.mean(r["fold_map3"]), abs=1e-4) and r["std"] == pytest.approx(np.std(r["fold_map3"], ddof=1), abs=1e-4)
        assert set(r["per_question"]) == set(df["QuestionId"])
        oof = np.load(root / name / "oof.npz")
        assert sorted(oof["row_id"]) == sorted(df["row_id"])  # the union of the folds covers every row once
    e = report["ensemble"]
    assert e["rows"] == len(df) and 0 < e["map3_held_out"] <= 1 and sum(e["weights"].values()) == pytest.approx(1)
    again = CliRunner().invoke(cli, ["cv", str(cv_root["config"]), "--json"])  # every fold done: nothing retrains
    assert again.exit_code == 0 and json.loads(again.stdout)["recipes"]["bert"]["fold_map3"] == report["recipes"]["bert"]["fold_map3"]


def test_ensemble_weights_fold_models_as_one_recipe(cv_root):
    root = cv_root["root"]
    dirs = [str(root / n / f"fold{k}" / "onnx") for n in ("bert", "words") for k in range(3)]
    fitted = fit(dirs)
    assert fitted["recipes"] == 2 and fitted["rows"] == len(load_labelled(str(SAMPLE_TRAIN)))
    bert, words = sum(fitted["weights"][:3]), sum(fitted["weights"][3:])
    assert bert + words == pytest.approx(1) and len(set(fitted["weights"][:3])) == 1  # a recipe's share, split evenly
    one_fold = fit([dirs[0], dirs[3]])  # the two recipes' fold 0 alone: the rows of fold 0
    df = load_labelled(str(SAMPLE_TRAIN))
    assert one_fold["rows"] == int((assign_folds(df, 3, 42) == 0).sum())


def test_the_full_refits_package_with_weights_from_their_folds_and_run(cv_root, tmp_path):
    root = cv_root["root"]
    assert "bert, full refit: no held-out rows" in cv_root["more"]
    meta = json.loads((root / "bert" / "full" / "run" / "mapbuild.json").read_text())
    assert meta["config"]["full"] and meta["config"]["oof"] == str(root / "bert" / "oof.npz") and meta["metrics"]["rows_valid"] == 0
    full = [str(root / n / "full" / "onnx") for n in ("bert", "words")]
    folds = [str(root / n / f"fold{k}" / "onnx") for n in ("bert", "words") for k in range(3)]
    assert fit(full)["weights"] == pytest.approx(fit(folds)["weights"][::3] * np.array([3]))
    manifest = package(full, tmp_path / "bundle", "me/tiny-refit", wheels=False)
    assert manifest["ensemble"]["rows"] == len(load_labelled(str(SAMPLE_TRAIN)))
    out = tmp_path / "submission.csv"
    done = run_kernel(tmp_path / "bundle", "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0 and check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []
    kept = [m["name"] for m in load_manifest(tmp_path / "bundle")["members"]]
    assert all(m in done.stderr for m in kept)


def test_a_finished_fold_of_other_options_is_never_reported_as_the_changed_recipe(cv_root):
    changed = cv_root["config"].with_name("changed.toml")
    changed.write_text(cv_root["config"].read_text().replace("epochs = 2", "epochs = 3"))
    result = CliRunner().invoke(cli, ["cv", str(changed), "--only", "words"])  # bert is not retrained, but reported
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: ") and "bert/fold0: trained with other options than the config's now" in last


def test_a_fold_trained_before_an_option_existed_is_kept_while_that_option_is_at_its_default(cv_root, tmp_path):
    import shutil

    from builder.build import done, load_config
    from builder.cv import fold_spec

    member = next(m for m in load_config(cv_root["config"])[1] if m.name == "words")
    dest = tmp_path / "fold0"
    shutil.copytree(cv_root["root"] / "words" / "fold0", dest)
    meta = json.loads((dest / "onnx" / "mapbuild.json").read_text())
    del meta["config"]["relabel"], meta["files"]  # as folders written before `relabel` was a split option
    (dest / "onnx" / "mapbuild.json").write_text(json.dumps(meta))
    assert done(dest, member._replace(config=fold_spec(member, 0)))
    with pytest.raises(MapbuildError, match="trained with other options"):
        done(dest, member._replace(config=fold_spec(member._replace(config=dataclasses.replace(member.config, relabel=True)), 0)))


def test_cv_names_unknown_recipes_and_bad_folds(cv_root):
    assert_one_line_error(CliRunner().invoke(cli, ["cv", str(cv_root["config"]), "--only", "gpt"]), "--only gpt")
    assert_one_line_error(CliRunner().invoke(cli, ["cv", str(cv_root["config"]), "--folds", "7"]), "--folds 7: bert has folds 0..2")
    bad = CliRunner().invoke(cli, ["cv", str(cv_root["config"]), "--folds", "a"])
    assert bad.exit_code == 2 and "Invalid value for --folds: 'a': give fold numbers such as 0,1" in bad.output


def words_config(root: Path) -> Path:
    """A TF-IDF recipe on the sample: `cv` and `build` of it take seconds."""
    config = root / "words.toml"
    config.write_text(f'dataset_id = "me/tiny-words"\nout = "out"\nwheels = false\n[[models]]\nname = "words"\nkind = "tfidf"\ndata = "{SAMPLE_TRAIN}"\nfolds = 3\nmin_df = 1\n')
    return config


def test_build_after_cv_keeps_the_finished_fold(tmp_path):
    """Before: build trained fold 0 again into OUT/NAME/onnx, beside cv's OUT/NAME/fold0 (50 min for a MiniLM fold)."""
    config = words_config(tmp_path)
    first = CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"])
    assert first.exit_code == 0, first.output
    fold = tmp_path / "out" / "words" / "fold0"
    files = lambda: {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fold.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    built = CliRunner().invoke(cli, ["build", str(config)])
    assert built.exit_code == 0, built.output
    assert "== words, fold 0: done before, kept" in built.stderr and files() == before
    assert sorted(p.name for p in (tmp_path / "out" / "words").iterdir()) == ["fold0", "oof.npz"]
    assert len(load_manifest(tmp_path / "out" / "bundle")["members"]) == 1  # the kept fold, packaged


def test_build_refuses_a_member_folder_of_the_old_layout_in_one_line(tmp_path):
    config = words_config(tmp_path.resolve())
    old = tmp_path.resolve() / "out" / "words" / "onnx"
    old.mkdir(parents=True)
    result = CliRunner().invoke(cli, ["build", str(config)])
    assert_one_line_error(result, f"{old.parent}: holds onnx of an older build", f"move them into {old.parent / 'fold0'} or remove them")
    assert sorted(p.name for p in old.parent.iterdir()) == ["onnx"]


def own_data_config(root: Path, recipe: str = 'kind = "tfidf"\nmin_df = 1') -> tuple[Path, Path]:
    """A config of one recipe `t` on a copy of the sample that a test may change between sessions; (config, data)."""
    data = root / "train.csv"
    data.write_bytes(SAMPLE_TRAIN.read_bytes())
    config = root / "t.toml"
    config.write_text(f'dataset_id = "me/tiny-t"\nout = "out"\nwheels = false\n[[models]]\nname = "t"\ndata = "train.csv"\nfolds = 3\n{recipe}\n')
    return config, data


@pytest.mark.parametrize("change", ["fewer rows", "reordered"])
def test_cv_refuses_a_fold_trained_on_a_data_file_changed_since(tmp_path, change):
    """Before: fewer rows were reported as one cross-validation of folds dealt from two files (rows held out twice,
    others never); reordered rows, a traceback."""
    config, data = own_data_config(tmp_path)
    assert CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"]).exit_code == 0
    header, *lines = data.read_text().splitlines(keepends=True)
    data.write_text(header + "".join(lines[:-40] if change == "fewer rows" else lines[::-1]))
    fold = tmp_path / "out" / "t" / "fold0"
    assert_one_line_error(CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"]), f"{data}: changed since train read it (sha256 ", f"restore the file, or remove {fold} to train the fold again")
    meta = json.loads((fold / "onnx" / "mapbuild.json").read_text())
    del meta["provenance"], meta["files"]  # as folders written before provenance was recorded: nothing to compare, kept
    (fold / "onnx" / "mapbuild.json").write_text(json.dumps(meta))
    kept = CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"])
    if change == "reordered":
        assert kept.exit_code == 0 and "t, fold 0: done before, kept" in kept.stderr, kept.output
    else:  # rows it held out are gone from the file: the report says so, in one line
        last = kept.output.strip().splitlines()[-1]  # after the progress line "done before, kept"
        assert kept.exit_code == 1 and "Traceback" not in kept.output and f"{fold.parent}: its folds hold 18 rows that {data} no longer has" in last


def test_cv_refuses_a_fold_exported_at_another_precision_than_the_recipe_now_asks(tmp_path, tiny_bert):
    """Before: the int8 fold was kept with "done before, kept" for a recipe that now asks fp32."""
    config, _ = own_data_config(tmp_path, f'kind = "knn"\nmodel = "{tiny_bert}"\nmax_length = 64\nquantize = "int8"')
    first = CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"])
    assert first.exit_code == 0, first.output
    config.write_text(config.read_text().replace('quantize = "int8"', 'quantize = "fp32"'))
    result = CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"])
    assert_one_line_error(result, f"{tmp_path / 'out' / 't' / 'fold0'}: exported at int8, but the config now asks quantize = 'fp32'")


@pytest.mark.parametrize("lost", ["oof.npz", "metrics.json"])
def test_cv_names_a_run_file_a_finished_fold_lost(tmp_path, lost):
    """Before: a traceback from cv's report (np.load, read_text)."""
    config, _ = own_data_config(tmp_path)
    assert CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"]).exit_code == 0
    gone = tmp_path / "out" / "t" / "fold0" / "onnx" / lost
    gone.unlink()
    assert_one_line_error(CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"]), f"{gone}: missing", "to train the fold again")


def test_a_fold_kept_with_force_past_the_drift_gate_is_refused_once_the_recipe_drops_force(tmp_path):
    from builder.build import done, load_config
    from builder.cv import fold_spec

    config, _ = own_data_config(tmp_path)
    assert CliRunner().invoke(cli, ["cv", str(config), "--folds", "0"]).exit_code == 0
    fold = tmp_path / "out" / "t" / "fold0"
    meta = json.loads((fold / "onnx" / "mapbuild.json").read_text())
    # as a transformer's int8 export that lost 0.1 MAP@3 to PyTorch, kept with force = true
    meta |= {"precision": "int8", "drift": {"rows": 10, "map3_reference": 0.8, "map3_onnx": 0.7}}
    rewrite_record(fold / "onnx", meta)
    member = load_config(config)[1][0]
    forced = member._replace(config=fold_spec(member, 0), kind="transformer", quantize="int8", force=True)
    assert done(fold, forced)
    with pytest.raises(MapbuildError, match="fails the drift gate and was kept with force = true, which the config no longer sets"):
        done(fold, forced._replace(force=False))
