"""featx audit: the checks on planted faults, the report, the exclude list and --exclude."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import (TINY, TOY, dogcat_path, invoke, last_json, make_dataset, register_toy,
                      write_image)
from featx import auditing as featx_audit
from featx.api import audit, compare, fit
from featx.auditing import audit_findings, exclude_entries
from featx.cli import cli
from featx.data import discover, read_exclude_file, write_exclude_file
from featx.errors import DataError, UsageError
from featx.extraction import extract
from featx.options import AuditOptions

TINY_ARGS = ["--backbone", "mobilenet_v2", "--weights", "random", "--input-size", "32",
             "--no-progress"]


def clusters(n_classes=4, per_class=50, dim=32, seed=0, spread=0.35):
    """Unit-ish Gaussian clusters, one per class: embeddings a linear model separates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    X = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return X.astype(np.float32), labels


# ----- the checks, on arrays --------------------------------------------------------------
def test_near_duplicates_blockwise_equals_the_full_matrix():
    X, _ = clusters(per_class=40)
    X[7] = X[100] * 3.0  # same direction: cosine 1
    X[150] = X[20] + 0.01
    Z = featx_audit.normalized(X)
    (i, j, sim), nearest = featx_audit.near_duplicates(Z, 0.95, block_bytes=4 * len(Z) * 7)
    full = Z @ Z.T
    np.fill_diagonal(full, -1)
    want_i, want_j = np.nonzero(np.triu(full >= 0.95, k=1))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(want_i.tolist(), want_j.tolist()))
    assert (7, 100) in set(zip(i.tolist(), j.tolist()))
    np.testing.assert_allclose(nearest, full.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(sim, full[i, j], atol=1e-6)


def test_duplicate_groups_kinds_and_exact_copies():
    labels = np.array([0, 0, 1, 0, 0, 0, 1])
    splits = np.array(["train", "val", "train", "train", "train", "train", "train"])
    sha = np.array(["a", "a", "b", "c", "d", "e", "f"])
    pairs = (np.array([0, 2, 4]), np.array([1, 3, 5]), np.array([1.0, 0.95, 0.93]))
    component = featx_audit.duplicate_components(pairs, 7)
    assert len(set(component.tolist())) == 4  # three pairs and one image alone
    groups = featx_audit.duplicate_groups(pairs, component, labels, splits, sha)
    assert [(g["members"], g["kind"], g["exact"]) for g in groups] == [
        ([0, 1], "across splits", True),
        ([2, 3], "conflicting labels", False),
        ([4, 5], "same class", False)]


def test_label_issues_rank_flipped_labels_first():
    X, labels = clusters(n_classes=4, per_class=50)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(labels), 10, replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + 1) % 4
    found, skipped = featx_audit.label_issues(X, noisy, list("abcd"), folds=5, seed=0)
    top = [f["index"] for f in found[:20]]
    assert len(set(top) & set(flipped.tolist())) >= 9
    assert skipped == []
    first = found[0]
    assert first["suggested"] == labels[first["index"]] != first["label"]
    assert first["p_given"] < first["p_suggested"]


def test_label_issues_say_what_they_skip():
    X, labels = clusters(n_classes=3, per_class=20)
    labels = labels.copy()
    labels[:17] = 2  # class 0 keeps 3 images
    found, skipped = featx_audit.label_issues(X, labels, ["cat", "dog", "fox"], folds=5)
    assert len(skipped) == 1 and "fewer than 5 images ('cat')" in skipped[0]
    assert all(f["label"] != 0 for f in found)
    found, skipped = featx_audit.label_issues(X, np.zeros(len(X), int), ["cat"], folds=5)
    assert found == [] and len(skipped) == 1 and "need two or more" in skipped[0]


def test_label_issues_keep_near_duplicates_in_one_fold():
    X, labels = clusters(n_classes=2, per_class=30)
    groups = np.arange(len(labels))
    groups[[0, 1, 2]] = 0  # one group of three
    cv = featx_audit._checks._folds(labels, groups, 5, seed=0)
    fold = cv.test_fold
    assert fold[0] == fold[1] == fold[2]
    assert sorted(np.bincount(fold).tolist())[0] >= 10  # still about a fifth each
    component = np.r_[np.zeros(25, int), np.ones(3, int), np.arange(2, 12)]
    groups = featx_audit.fold_groups(component)
    assert len(set(groups[:25].tolist())) == 25  # a chain of 25 look-alikes: split freely
    assert len(set(groups[25:28].tolist())) == 1


def test_outliers_flag_far_images_of_their_class():
    X, labels = clusters(n_classes=3, per_class=40, spread=0.2)
    rng = np.random.default_rng(5)
    planted = [3, 45, 90]
    X[planted] = rng.normal(size=(3, X.shape[1])) * 3
    found, skipped = featx_audit.outliers(featx_audit.normalized(X), labels, list("abc"),
                                          neighbours=5)
    assert set(planted) <= {f["index"] for f in found[:6]}
    assert skipped == []


def test_outliers_of_a_class_of_copies_are_not_every_image():
    Z = featx_audit.normalized(np.tile(np.eye(4, dtype=np.float32)[:1], (12, 1)))
    Z[11] = featx_audit.normalized(np.ones((1, 4), np.float32))
    Z[10] = featx_audit.normalized(np.array([[1.0, 1e-3, 0, 0]], np.float32))  # a hair off
    found, skipped = featx_audit.outliers(Z, np.zeros(12, int), ["a"], neighbours=3)
    assert [f["index"] for f in found] == [11]
    found, skipped = featx_audit.outliers(Z[:4], np.zeros(4, int), ["tiny"])
    assert found == [] and "fewer than 5 images ('tiny')" in skipped[0]


def test_audit_rows_reports_non_finite_embeddings():
    X, labels = clusters(n_classes=2, per_class=20)
    X[3, 5] = np.nan
    result = featx_audit.audit_rows(X, labels, np.array(["train"] * 40),
                                    np.arange(40).astype(str), ["a", "b"],
                                    AuditOptions(map="pca"))
    assert any("1 rows hold NaN or inf" in line for line in result.skipped)
    assert 3 in {f["index"] for f in result.outliers}


def test_audit_rows_survives_one_class():
    X, _ = clusters(n_classes=1, per_class=30)
    X[1] = X[0]
    result = featx_audit.audit_rows(X, np.zeros(30, int), np.array(["train"] * 30),
                                    np.arange(30).astype(str), ["cat"],
                                    AuditOptions(top=1, map="pca"))
    assert result.label_errors == [] and any("label errors" in s for s in result.skipped)
    assert result.counts["same class"] == 1 and len(result.duplicates) == 1
    assert result.coords.shape == (30, 2) and result.map_method == "pca"


def test_audit_options_refuse_bad_values():
    with pytest.raises(UsageError, match="threshold"):
        AuditOptions(threshold=0)
    with pytest.raises(UsageError, match="map"):
        AuditOptions(map="umap")


# ----- exclude lists ------------------------------------------------------------------------
def test_exclude_file_round_trip(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    listed = write_exclude_file(tmp_path / "x" / "exclude.txt",
                                [("cat/cat_001.png", "outlier # of sorts"),
                                 ("dog/dog_002.png", "label")])
    text = listed.read_text()
    assert "cat/cat_001.png  # outlier # of sorts" in text
    with listed.open("a") as f:
        f.write(f"\n# a comment line\n{(data / 'dog' / 'dog_004.png').resolve()}\n   \n")
    assert read_exclude_file(listed, data) == {"cat/cat_001.png", "dog/dog_002.png",
                                               "dog/dog_004.png"}
    with pytest.raises(DataError, match="exclude file not found"):
        read_exclude_file(tmp_path / "missing.txt", data)


def test_manifest_without_keeps_every_other_split(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=10)
    manifest = discover(data)
    dropped = {manifest.paths[0], manifest.paths[-1]}
    smaller = manifest.without(dropped)
    assert len(smaller) == len(manifest) - 2
    before = dict(zip(manifest.paths, manifest.splits))
    assert all(before[p] == s for p, s in zip(smaller.paths, smaller.splits))


def test_copies_to_drop_keep_one_training_copy():
    group = {"kind": "across splits", "exact": True, "conflicting_labels": False,
             "similarity": 1.0, "members": [0, 1, 2]}
    result = featx_audit.Audit(options=AuditOptions(), duplicates=[group], label_errors=[],
                               outliers=[], counts={}, nearest={}, skipped=[], coords=None,
                               map_method="none", seconds={})
    findings = audit_findings(result, ["a.png", "b.png", "c.png"], [0, 0, 0],
                              ["val", "train", "test"], ["cat"])
    assert findings["duplicates"][0]["exclude"] == ["a.png", "c.png"]
    entries = dict(exclude_entries(findings))
    assert set(entries) == {"a.png", "c.png"} and "copy of b.png kept" in entries["a.png"]
    group["conflicting_labels"] = True
    findings = audit_findings(result, ["a.png", "b.png", "c.png"], [0, 1, 0],
                              ["val", "train", "test"], ["cat", "dog"])
    assert findings["duplicates"][0]["exclude"] == ["a.png", "b.png", "c.png"]


# ----- end to end on generated images ---------------------------------------------------------
def counting_mapper(monkeypatch):
    """Count the images every runtime built from now on embeds."""
    from featx.extraction import _run

    calls = {"images": 0}
    real = _run.open_mapper

    def open_counting(*args, **kwargs):
        mapper = real(*args, **kwargs)

        def counted(images):
            calls["images"] += len(images)
            return mapper(images)

        return counted

    monkeypatch.setattr(_run, "open_mapper", open_counting)
    return calls


def test_audit_cli_report_exclude_list_and_warm_cache(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=12)
    shutil.copy(data / "cat" / "cat_003.png", data / "dog" / "dog_copy.png")  # two labels
    cache, reports = tmp_path / "cache", tmp_path / "reports"
    calls = counting_mapper(monkeypatch)
    out = last_json(invoke("audit", data, *TINY_ARGS, "--cache-dir", cache, "--report-dir",
                           reports, "--top", "3", "--threshold", "0.9999", "--json"))
    assert calls["images"] == 37 and out["n_extracted"] == 37
    assert set(out["counts"]) == {"duplicates_across_splits", "duplicates_conflicting_labels",
                                  "duplicates_same_class", "label_errors", "outliers"}
    for name in ("audit.md", "audit.json", "duplicates.png", "map.png"):
        assert (reports / name).is_file(), name
    report = json.loads((reports / "audit.json").read_text())
    counts = report["counts"]  # audit.json lists every finding; --top cuts audit.md only
    assert [len(report[k]) for k in ("duplicates", "label_errors", "outliers")] == [
        counts["duplicate_groups"], counts["label_errors"], counts["outliers"]]
    markdown = (reports / "audit.md").read_text()
    if counts["label_errors"] > 3:
        assert f"{counts['label_errors'] - 3} more in audit.json." in markdown
    copies = [g for g in report["duplicates"]
              if {"cat/cat_003.png", "dog/dog_copy.png"} <= {m["path"] for m in g["members"]}]
    assert copies and copies[0]["conflicting_labels"] and copies[0]["exact"]
    assert report["threshold"]["cosine"] == 0.9999
    assert "dogcat" in report["threshold"]["evidence"]
    assert "Near-duplicates" in (reports / "audit.md").read_text()

    exclude = tmp_path / "exclude.txt"
    again = last_json(invoke("audit", data, *TINY_ARGS, "--cache-dir", cache, "--report-dir",
                             reports, "--threshold", "0.9999", "--write-exclude", exclude,
                             "--json"))
    assert calls["images"] == 37 and again["n_extracted"] == 0  # warm: no forward pass
    listed = read_exclude_file(exclude, data)
    assert {"cat/cat_003.png", "dog/dog_copy.png"} <= listed
    assert again["n_exclude"] == len(listed)

    kept = last_json(invoke("extract", data, *TINY_ARGS, "--cache-dir", cache, "--exclude",
                            exclude, "--json"))
    assert kept["n_excluded"] == len(listed) and kept["n_images"] == 37 - len(listed)
    assert kept["n_extracted"] == 0
    fitted = fit(data, "softmax", tune=False, cache_dir=cache, exclude=exclude,
                 out=tmp_path / "models", progress=False, **TINY)
    assert fitted["n_excluded"] == len(listed)
    result = compare(data, ("softmax",), tune=False, cache_dir=cache, exclude=exclude,
                     report_dir=tmp_path / "cmp", progress=False, **TINY)
    assert result["dataset"]["excluded"] == len(listed)
    assert f"Excluded: {len(listed)} images" in (tmp_path / "cmp" / "report.md").read_text()
    full = extract(data, cache_dir=cache, progress=False, **TINY)  # rows kept in the cache
    assert len(full) == 37 and full.stats.n_extracted == 0


def test_exclude_only_skips_listed_files_and_keeps_splits(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=10)
    cache = tmp_path / "cache"
    exclude = write_exclude_file(tmp_path / "x.txt", [("cat/cat_004.png", "test"),
                                                      ("nowhere/img.png", "not in data")])
    part = extract(data, cache_dir=cache, exclude=exclude, progress=False, **TINY)
    assert part.stats.n_extracted == 19 and part.stats.n_excluded == 1
    assert "cat/cat_004.png" not in part.paths.tolist()
    whole = extract(data, cache_dir=cache, progress=False, **TINY)
    assert whole.stats.n_extracted == 1  # only the excluded file is new
    split_of = dict(zip(whole.paths.tolist(), whole.split.tolist()))
    assert all(split_of[p] == s for p, s in zip(part.paths.tolist(), part.split.tolist()))
    X, _ = part.take(part.indices("train"))
    Y, _ = whole.take([whole.paths.tolist().index(p) for p in part.paths[part.indices("train")]])
    np.testing.assert_array_equal(X, Y)


def test_finetune_leaves_out_excluded_images(tmp_path, monkeypatch):
    from featx.finetuning import finetune

    register_toy(monkeypatch)  # the exclusion, not the network, is under test
    data = make_dataset(tmp_path / "data", per_class=8)
    exclude = write_exclude_file(tmp_path / "x.txt", [("cat/cat_001.png", "t"),
                                                      ("dog/dog_002.png", "t")])
    result = finetune(data, warmup_epochs=1, epochs=0, batch_size=8, out=tmp_path / "m",
                      cache_dir=tmp_path / "cache", exclude=exclude, progress=False, **TOY)
    assert result.n_excluded == 2 and sum(result.split_counts.values()) == 14


def test_write_exclude_keeps_what_exclude_left_out(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=10)
    exclude = write_exclude_file(tmp_path / "x.txt", [("cat/cat_001.png", "by hand")])
    out = audit(data, report_dir=tmp_path / "r", write_exclude=exclude, exclude=exclude,
                cache_dir=tmp_path / "cache", progress=False, **TINY)
    listed = read_exclude_file(exclude, data)
    assert "cat/cat_001.png" in listed and out["n_exclude"] == len(listed)
    assert "listed in" in exclude.read_text()


def test_audit_of_a_tiny_folder_says_what_it_skipped(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    out = audit(data, report_dir=tmp_path / "r", cache_dir=tmp_path / "cache",
                progress=False, **TINY)
    assert out["n_images"] == 4
    assert [line.split(":")[0] for line in out["skipped"]] == ["label errors", "outliers"]
    text = (tmp_path / "r" / "audit.md").read_text()
    assert "label errors: skipped" in text and (tmp_path / "r" / "audit.json").is_file()


def test_map_of_many_classes_without_findings(tmp_path):
    from featx.auditing import embedding_map_png

    X, labels = clusters(n_classes=25, per_class=4)
    result = featx_audit.Audit(options=AuditOptions(), duplicates=[], label_errors=[],
                               outliers=[], counts={}, nearest={}, skipped=[],
                               coords=X[:, :2], map_method="pca", seconds={})
    path = embedding_map_png(result, labels, [f"c{i}" for i in range(25)],
                             tmp_path / "map.png", top=20)
    assert path.stat().st_size > 1000


def test_audit_bad_exclude_file_is_one_line(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    result = CliRunner().invoke(cli, ["audit", str(data), *TINY_ARGS, "--exclude",
                                      str(tmp_path / "none.txt")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].endswith("none.txt: exclude file not found")


# ----- real photos and real weights --------------------------------------------------------
def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def plant_faults(source: Path, root: Path, per_class=200):
    """A train/val copy of dogcat with known faults; returns what was planted."""
    import cv2

    rng = np.random.default_rng(7)
    planted = {"moved": [], "exact": [], "resized": [], "noise": []}
    for name in ("cat", "dog"):
        files = sorted((source / name).glob("*.jpg"))[:per_class]
        for k, f in enumerate(files):
            split = "val" if k % 5 == 0 else "train"
            (root / split / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / split / name / f.name)
    for k, f in enumerate(sorted((root / "train" / "cat").glob("*.jpg"))[:5]
                          + sorted((root / "train" / "dog").glob("*.jpg"))[:5]):
        other = "dog" if f.parent.name == "cat" else "cat"
        target = root / "train" / other / f.name
        shutil.move(f, target)
        planted["moved"].append(target.relative_to(root).as_posix())
    vals = sorted(root.glob("val/*/*.jpg"))
    big = [f for f in vals if min(cv2.imread(str(f)).shape[:2]) >= 250]
    for f in big[:5]:  # an exact copy in train
        copy = root / "train" / f.parent.name / f"copy_{f.name}"
        shutil.copy(f, copy)
        planted["exact"].append((_rel(f, root), _rel(copy, root)))
    for k, f in enumerate(big[5:10]):  # re-encoded, or resized, in train
        image = cv2.imread(str(f))
        if k % 2:
            image = cv2.resize(image, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
        copy = root / "train" / f.parent.name / f"re_{f.stem}.jpg"
        cv2.imwrite(str(copy), image, [cv2.IMWRITE_JPEG_QUALITY, 60 if k % 2 == 0 else 85])
        planted["resized"].append((_rel(f, root), _rel(copy, root)))
    for k, name in enumerate(("cat", "dog", "cat")):
        noise = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
        path = root / "train" / name / f"noise_{k}.png"
        write_image(path, noise)
        planted["noise"].append(path.relative_to(root).as_posix())
    return planted


@pytest.mark.e2e
def test_audit_finds_planted_faults_in_real_photos(tmp_path, monkeypatch):
    planted = plant_faults(dogcat_path(), tmp_path / "data")
    data, cache = tmp_path / "data", tmp_path / "cache"
    fewer = AuditOptions(candidates=3)  # the planted copies are each other's nearest
    first = audit(data, report_dir=tmp_path / "r1", cache_dir=cache, progress=False,
                  audit_options=fewer)
    assert first["n_extracted"] == first["n_images"] > 400
    calls = counting_mapper(monkeypatch)
    out = audit(data, report_dir=tmp_path / "r2", cache_dir=cache, progress=False,
                write_exclude=tmp_path / "exclude.txt", audit_options=fewer)
    assert calls["images"] == 0 and out["n_extracted"] == 0
    report = json.loads((tmp_path / "r2" / "audit.json").read_text())

    flagged = [f["path"] for f in report["label_errors"][:20]]
    assert len(set(flagged) & set(planted["moved"])) >= 9, flagged

    groups = [({m["path"] for m in g["members"]}, g) for g in report["duplicates"]]
    for pair in planted["exact"] + planted["resized"]:
        group = next((g for members, g in groups if set(pair) <= members), None)
        assert group is not None, pair
        assert group["kind"] == "across splits", (pair, group["kind"])
        assert group["exact"] == (pair in planted["exact"]), pair

    outliers = {f["path"] for f in report["outliers"]}
    assert set(planted["noise"]) <= outliers, report["outliers"]
    listed = read_exclude_file(tmp_path / "exclude.txt", data)
    assert set(planted["noise"]) <= listed and len(set(planted["moved"]) & listed) >= 9


def test_report_of_a_long_duplicate_chain_stays_readable(tmp_path):
    from featx.auditing import write_audit_report

    group = {"kind": "same class", "exact": False, "conflicting_labels": False,
             "similarity": 0.95, "members": list(range(15))}
    result = featx_audit.Audit(options=AuditOptions(), duplicates=[group], label_errors=[],
                               outliers=[], counts={"across splits": 0, "same class": 1,
                                                    "conflicting labels": 0,
                                                    "conflicting_labels_any": 0,
                                                    "duplicate_groups": 1, "label_errors": 0,
                                                    "outliers": 0},
                               nearest={}, skipped=[], coords=None, map_method="none",
                               seconds={})
    paths = [f"cat/{i:02d}.png" for i in range(15)]
    findings = audit_findings(result, paths, [0] * 15, ["train"] * 15, ["cat"])
    dataset = {"root": str(tmp_path / "missing"), "n_images": 15, "class_names": ["cat"],
               "backbone": "toy", "weights_id": "random", "provenance": "test"}
    files = write_audit_report(result, findings, dataset, tmp_path / "r", labels=[0] * 15)
    text = Path(files["markdown"]).read_text()
    assert "and 5 more (audit.json)" in text
    assert Path(files["duplicates"]).is_file()  # unreadable images become grey thumbnails


# ----- copies confirmed from the images ------------------------------------------------
def _scene(seed, size=(240, 320)):
    """A photo-like RGB picture with corners to match: random shapes on a noisy ground."""
    import cv2

    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 255, (*size, 3), dtype=np.uint8), (0, 0), 3)
    for _ in range(40):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, size[1])), int(rng.integers(0, size[0]))
        if rng.random() < 0.5:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(8, 50)),
                                          y + int(rng.integers(8, 50))), colour, -1)
        else:
            cv2.circle(image, (x, y), int(rng.integers(4, 25)), colour, -1)
    return image


def test_the_verifier_names_crops_mirrors_and_edits_and_refuses_another_scene(tmp_path):
    import cv2

    original = _scene(0)
    h, w = original.shape[:2]
    captioned = original.copy()
    cv2.putText(captioned, "copy", (20, 120), cv2.FONT_HERSHEY_DUPLEX, 2, (255, 255, 255), 3)
    images = {"original": original, "crop": cv2.resize(original[40:200, 60:280], (w, h)),
              "mirror": original[:, ::-1], "half": cv2.resize(original, (w // 2, h // 2)),
              "caption": captioned, "other": _scene(1)}
    for name, image in images.items():
        cv2.imwrite(str(tmp_path / f"{name}.png"), image[:, :, ::-1])
    names = list(images)
    store = featx_audit.LocalFeatureStore(tmp_path / "features.h5")
    verify = featx_audit.CopyVerifier(tmp_path, [f"{n}.png" for n in names],
                                      [f"{k:064x}" for k in range(len(names))], store=store)
    kinds = {name: (verify(0, k, 0.95) or {}).get("kind") for k, name in enumerate(names)}
    assert kinds == {"original": "same", "crop": "cropped", "mirror": "mirrored",
                     "half": "scaled", "caption": "same", "other": None}
    verify.save()
    again = featx_audit.CopyVerifier(tmp_path, [f"{n}.png" for n in names],
                                     [f"{k:064x}" for k in range(len(names))],
                                     store=featx_audit.LocalFeatureStore(tmp_path / "features.h5"))
    assert [again(0, k, 0.95) for k in range(len(names))] == [
        verify(0, k, 0.95) for k in range(len(names))]
    assert again.store.computed == 0  # a warm audit computes no keypoint and no fit again
    again(1, 2, 0.95)  # a pair not asked before, of images whose keypoints are stored
    again.save()
    assert len(featx_audit.LocalFeatureStore(tmp_path / "features.h5")._read_fits()) == \
        len(names) + 1  # its fit is kept too
    (tmp_path / "other.png").unlink()  # unreadable: the embedding-only rule decides
    gone = featx_audit.CopyVerifier(tmp_path, ["original.png", "other.png"], ["", ""])
    assert gone(0, 1, 0.95) == {"kind": "unverified", "inliers": None}
    assert gone(0, 1, 0.5) is None
    assert "1 image(s) could not be read" in gone.notes()[0]


def test_groups_form_from_confirmed_pairs_only():
    Z, _ = clusters(n_classes=1, per_class=6, dim=16, spread=0.05)  # six look-alikes
    confirmed = {(0, 1): "cropped", (3, 4): "mirrored"}

    def verify(i, j, cosine):
        kind = confirmed.get((i, j))
        return {"kind": kind, "inliers": 99} if kind else None

    found = featx_audit.audit_rows(Z.copy(), np.zeros(6, int), np.array(["train"] * 6),
                                   [f"{k:064x}" for k in range(6)], ["a"],
                                   AuditOptions(candidate_cosine=0.5), verify=verify)
    assert sorted(g["members"] for g in found.duplicates) == [[0, 1], [3, 4]]
    assert [g["copy_kinds"] for g in sorted(found.duplicates, key=lambda g: g["members"])] == [
        ["cropped"], ["mirrored"]]
    unverified = featx_audit.audit_rows(Z.copy(), np.zeros(6, int), np.array(["train"] * 6),
                                        [f"{k:064x}" for k in range(6)], ["a"],
                                        AuditOptions(threshold=0.5, verify=False), verify=verify)
    assert [g["members"] for g in unverified.duplicates] == [list(range(6))]  # one chain
