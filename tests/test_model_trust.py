"""Model files that cannot run code: classifiers are saved as .skops and loaded with featx's
allow-list of types; a .joblib pickle (featx 0.1) loads only with an explicit trust flag,
whatever its sidecar says; fine-tuned .keras files load in Keras' safe mode."""

import json
import os
import pathlib

import numpy as np
import pytest

from conftest import invoke, last_json
from featx._io import save_artifact
from featx.classifiers import (TRUSTED_TYPES, class_scores, classifier_names, fit_classifier,
                               load_model, save_model)
from featx.errors import DataError, UsageError

# what changes the types a classifier holds: calibration (either method), class weights
VARIANTS = ({}, {"class_weight": "balanced", "calibrate": "sigmoid"})


def features(n_classes: int):
    rng = np.random.default_rng(n_classes)
    y = np.arange(36) % n_classes
    return (rng.normal(size=(36, 5)) + y[:, None]).astype(np.float32), y


def one_error_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_every_classifier_round_trips_and_needs_the_allow_list_exactly(tmp_path):
    import skops.io as sio

    needed = set()
    X, y = features(3)  # two classes hold the same types (measured)
    fits = [(name, variant) for name in classifier_names() for variant in VARIANTS]
    for number, (name, variant) in enumerate(fits + [("svm", {"calibrate": "isotonic"})]):
        fitted = fit_classifier(name, X, y, tune=False, cv=2, n_jobs=1, **variant).estimator
        path = save_model(fitted, tmp_path, f"{name}-{number}", {})
        needed |= set(sio.get_untrusted_types(file=path))
        loaded, metadata = load_model(path)
        assert path.suffix == ".skops" and metadata["artifact"] == path.name
        np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
        np.testing.assert_array_equal(class_scores(loaded, X), class_scores(fitted, X))
    assert needed == set(TRUSTED_TYPES)  # each listed type is needed, and nothing else


def test_a_skops_file_holding_another_type_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    hostile = make_pipeline(FunctionTransformer(os.system), LogisticRegression())
    path = tmp_path / "m.skops"
    save_artifact(path, lambda tmp: sio.dump(hostile, tmp), {"artifact": path.name})
    with pytest.raises(DataError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert f"allow-list: {os.system.__module__}.system" in message


class Touch:
    """Unpickling this creates ``target``: what any pickle could do instead."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


@pytest.fixture
def crafted(tmp_path):
    """A .joblib whose sidecar's SHA-256 matches, as featx 0.1 wrote them; and the file its
    unpickling would create."""
    import joblib

    target, model = tmp_path / "created", tmp_path / "models" / "m.joblib"
    model.parent.mkdir()
    save_artifact(model, lambda tmp: joblib.dump(Touch(target), tmp),
                  {"kind": "featx-classifier", "format": 1, "artifact": model.name,
                   "classes": ["a", "b"]})
    return model, target


def test_a_crafted_pickle_is_refused_without_the_flag(crafted):
    model, target = crafted
    for path in (model, model.with_suffix(".json")):
        with pytest.raises(UsageError) as info:
            load_model(path)
        message = str(info.value)
        assert "\n" not in message and "runs whatever code it holds" in message
        assert f"`featx convert-model {path} --trust-pickle`" in message
    assert not target.exists()
    with pytest.raises(DataError, match="not a fitted classifier"):
        load_model(model, trust_pickle=True)  # the flag is what lets it run
    assert target.exists()


@pytest.mark.parametrize("command", [["predict", "{model}", "{model}"], ["export", "{model}"],
                                     ["convert-model", "{model}"]])
def test_the_cli_refuses_a_crafted_pickle_in_one_line(crafted, command):
    model, target = crafted
    error = one_error_line(invoke(*[word.format(model=model) for word in command]))
    assert "it is a pickle" in error and "--trust-pickle" in error
    assert not target.exists()


def test_an_old_model_converts_once_then_loads_without_trust(tmp_path):
    import joblib

    X, y = features(3)
    fitted = fit_classifier("softmax", X, y, tune=False, n_jobs=1).estimator
    old = tmp_path / "m.joblib"
    save_artifact(old, lambda tmp: joblib.dump(fitted, tmp),
                  {"format": 1, "artifact": old.name, "created": "2025-01-02T03:04:05+00:00"})
    assert "--trust-pickle" in one_error_line(invoke("convert-model", old))
    out = last_json(invoke("convert-model", old, "--trust-pickle", "--json"))
    assert out["model"] == str(tmp_path / "m.skops") and out["converted_from"] == str(old)
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["artifact"] == "m.skops" and sidecar["converted_from"] == "m.joblib"
    assert sidecar["format"] == 2 and sidecar["created"] == "2025-01-02T03:04:05+00:00"
    for path in (tmp_path / "m.skops", tmp_path / "m.json", old):  # the sidecar names .skops
        loaded, _ = load_model(path)
        np.testing.assert_array_equal(class_scores(loaded, X), class_scores(fitted, X))
    assert "already a .skops model" in one_error_line(
        invoke("convert-model", tmp_path / "m.skops", "--trust-pickle"))


def test_a_keras_model_with_a_lambda_layer_is_refused_not_run(tmp_path):
    import keras

    from featx.backbones import load_keras_model
    from featx.finetuning import load_finetuned, save_finetuned

    target, path = tmp_path / "created", tmp_path / "m.keras"
    # Keras saves a lambda's code without its closure: the path is a constant in the code
    code = eval(f"lambda v: (__import__('pathlib').Path({str(target)!r}).touch(), v)[1]")
    inputs = keras.Input((4,))
    hidden = keras.layers.Lambda(code)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="pred")(hidden))
    save_finetuned(model, path, {"featx_model": "finetune", "class_names": ["a", "b"]})
    target.unlink()  # building the model ran it once
    for load in (load_finetuned, load_keras_model):
        with pytest.raises(DataError) as info:
            load(path)
        assert "\n" not in str(info.value) and "safe mode" in str(info.value)
    assert "safe mode" in one_error_line(invoke("predict", path, tmp_path))
    assert not target.exists()
    keras.saving.load_model(str(path), safe_mode=False)  # what safe mode keeps from running
    assert target.exists()
