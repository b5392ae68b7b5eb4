"""A model directory's sampling_defaults.json adjusts the published defaults, and bad files are refused."""

import json

import pytest

from model.checkpoint import CheckpointError
from model.config import FAMILY_V1, FAMILY_V11
from model.demo import WEIGHTS_DIR
from model.sampling import SamplingError, published_defaults
from model.sampling_defaults import SAMPLING_DEFAULTS_FILE, SamplingDefaults
from server.config import Settings
from server.schemas import ImageRequest
from server.served_model import load_served_model
from server.validation import sampling_params


def test_a_directory_without_the_file_gets_the_published_defaults(tmp_path):
    defaults = SamplingDefaults.from_dir(tmp_path, FAMILY_V1)
    assert defaults.params(edit=False) == published_defaults(FAMILY_V1, edit=False)
    assert defaults.params(edit=True) == published_defaults(FAMILY_V1, edit=True)


def test_overrides_apply_per_mode_and_keep_the_rest(tmp_path):
    (tmp_path / SAMPLING_DEFAULTS_FILE).write_text(json.dumps({"edit": {"guidance_scale": 3.0, "num_steps": 20}}))
    defaults = SamplingDefaults.from_dir(tmp_path, FAMILY_V1)
    edit = defaults.params(edit=True)
    assert (edit.guidance_scale, edit.num_steps) == (3.0, 20)
    assert edit.timesteps_shift == published_defaults(FAMILY_V1, edit=True).timesteps_shift
    assert defaults.params(edit=False) == published_defaults(FAMILY_V1, edit=False)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps(["guidance_scale"]),
        json.dumps({"video": {}}),
        json.dumps({"edit": 2.0}),
        json.dumps({"text_to_image": {"guidance": 2.0}}),  # not a SamplingParams field
        json.dumps({"text_to_image": {"num_steps": 0}}),
        json.dumps({"text_to_image": {"sampler": "euler"}}),
    ],
)
def test_malformed_files_are_refused_when_the_model_loads(tmp_path, text):
    (tmp_path / SAMPLING_DEFAULTS_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=SAMPLING_DEFAULTS_FILE):
        SamplingDefaults.from_dir(tmp_path, FAMILY_V1)


def test_a_text_to_image_family_still_has_no_edit_defaults(tmp_path):
    (tmp_path / SAMPLING_DEFAULTS_FILE).write_text(json.dumps({"text_to_image": {"guidance_scale": 4.0}}))
    defaults = SamplingDefaults.from_dir(tmp_path, FAMILY_V11)
    assert defaults.params(edit=False).guidance_scale == 4.0
    with pytest.raises(SamplingError):
        defaults.params(edit=True)


def test_the_server_fills_unset_request_fields_from_the_served_models_defaults():
    served = load_served_model(Settings(model=str(WEIGHTS_DIR)))
    expected = SamplingDefaults.from_dir(WEIGHTS_DIR, served.config.family)
    for edit in (False, True):
        params = sampling_params(ImageRequest(prompt="a red circle"), Settings(), served.sampling_defaults, edit)
        assert params == expected.params(edit)
    overridden = sampling_params(ImageRequest(prompt="a red circle", guidance_scale=5.0), Settings(), served.sampling_defaults, False)
    assert overridden.guidance_scale == 5.0
