"""ControlUnit: validation, JSON round-trip (image as base64), the A1111 extension's API field
names and aliases, and infotext write/read."""
import base64
import io
import json

import pytest
from PIL import Image

from pipelines.control import ControlUnit, units_from_infotext
from pipelines.metadata import format_infotext, parse_infotext
from pipelines.request import GenerationRequest


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_defaults_follow_the_extension():
    unit = ControlUnit()
    assert (unit.module, unit.model, unit.weight, unit.control_mode, unit.resize_mode) == \
        ("none", "None", 1.0, "Balanced", "Crop and Resize")
    assert not unit.active  # no model: takes no part


def test_json_round_trip_through_the_request():
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    unit = ControlUnit(module="canny", model="control_v11p_sd15_canny", weight=0.5, guidance_end=0.8,
                       control_mode=1, resize_mode=0, image=image)
    request = GenerationRequest(control_units=(unit,))
    data = json.loads(json.dumps(request.to_dict()))
    again = GenerationRequest.from_dict(data)
    assert again.control_units == (unit,)
    assert again.control_units[0].image.tobytes() == image.tobytes()
    assert again.control_units[0].control_mode == "My prompt is more important"
    assert again.control_units[0].resize_mode == "Just Resize"


@pytest.mark.parametrize("changes, message", [
    (dict(weight=3), "weight"), (dict(guidance_start=0.8, guidance_end=0.2), "guidance"),
    (dict(control_mode="loud"), "control mode"), (dict(resize_mode=7), "resize mode"),
    (dict(processor_res=10), "processor resolution"),
])
def test_bad_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ControlUnit(**changes)


def test_request_rejects_a_unit_that_is_not_an_object():
    with pytest.raises(ValueError, match="JSON object"):
        GenerationRequest.from_dict({"control_units": ["canny"]})


def test_from_a1111_reads_the_extension_fields_and_aliases():
    image = Image.new("RGB", (8, 8), (0, 255, 0))
    unit = ControlUnit.from_a1111({
        "enabled": True, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", "weight": "0.7",
        "guidance_start": 0.1, "guidance_end": 0.9, "control_mode": "ControlNet is more important",
        "resize_mode": "Resize and Fill", "pixel_perfect": True, "processor_res": 384, "threshold_a": 50,
        "threshold_b": 150, "input_image": b64(image), "low_vram": False, "save_detected_map": True})
    assert unit.weight == 0.7 and unit.control_mode == "ControlNet is more important"
    assert unit.resize_mode == "Resize and Fill" and unit.pixel_perfect and unit.processor_res == 384
    assert (unit.threshold_a, unit.threshold_b) == (50, 150)
    assert unit.image.tobytes() == image.tobytes()
    as_ints = ControlUnit.from_a1111({"model": "x", "control_mode": 2, "resize_mode": 1,
                                      "image": {"image": "data:image/png;base64," + b64(image), "mask": None}})
    assert (as_ints.control_mode, as_ints.resize_mode) == ("ControlNet is more important", "Crop and Resize")
    assert as_ints.image.size == (8, 8)
    legacy = ControlUnit.from_a1111({"model": "x", "guessmode": True, "resize_mode": "Scale to Fit (Inner Fit)"})
    assert (legacy.control_mode, legacy.resize_mode) == ("ControlNet is more important", "Crop and Resize")
    with pytest.raises(ValueError, match="base64"):
        ControlUnit.from_a1111({"model": "x", "input_image": "not an image"})


def test_infotext_round_trip_restores_units_without_image():
    units = [ControlUnit(module="canny", model="control_tiny", weight=0.65, threshold_a=100, threshold_b=200,
                         guidance_end=0.5, pixel_perfect=True),
             ControlUnit(module="none", model="other", control_mode=2, resize_mode=0)]
    params = {"Steps": 20, "Sampler": "Euler a"}
    params |= {f"ControlNet {i}": u.infotext_value(u.model + " [abcd1234]") for i, u in enumerate(units)}
    text = format_infotext("a cat", "", params)
    assert 'ControlNet 0: "Module: canny, Model: control_tiny [abcd1234], Weight: 0.65, Resize Mode: Crop and ' \
           'Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 0.5, ' \
           'Pixel Perfect: True, Control Mode: Balanced"' in text
    restored = units_from_infotext(parse_infotext(text))
    assert [u.with_changes(model=u.model.split(" [")[0]) for u in restored] == units
    assert all(u.image is None for u in restored)


def test_gligen_boxes_round_trip_and_text_form():
    request = GenerationRequest(gligen_model="g", gligen_boxes="a cat: 0.1, 0.2, 0.5, 0.6\n a dog: 0.5 0.5 1 1")
    assert request.gligen_boxes == (("a cat", 0.1, 0.2, 0.5, 0.6), ("a dog", 0.5, 0.5, 1.0, 1.0))
    again = GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict())))
    assert again.gligen_boxes == request.gligen_boxes
    with pytest.raises(ValueError, match="at most 30"):
        GenerationRequest(gligen_boxes=[("x", 0, 0, 1, 1)] * 31)
