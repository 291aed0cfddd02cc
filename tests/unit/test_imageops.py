"""img2img / inpaint image operations, compared pixel for pixel."""
import numpy as np
import pytest
from PIL import Image

from pipelines import imageops

LANCZOS = Image.Resampling.LANCZOS


def noise_image(width, height, seed=0, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def pixels(image):
    return np.asarray(image).astype(np.int32)


def square_mask(size, box):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


# --- resize_image ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["just resize", "crop and resize", "resize and fill", 0, 1, 2, "Crop and resize"])
@pytest.mark.parametrize(("source", "target"), [((120, 50), (64, 96)), ((50, 130), (96, 40)), ((33, 77), (80, 80))])
def test_every_mode_gives_the_exact_size_in_rgb(mode, source, target):
    out = imageops.resize_image(noise_image(*source), *target, mode)
    assert out.size == target and out.mode == "RGB"


def test_other_modes_become_rgb_and_masks_keep_theirs():
    palette = noise_image(40, 30).convert("P")
    assert imageops.resize_image(palette, 64, 64, "resize and fill").mode == "RGB"
    assert imageops.resize_image(noise_image(40, 30, mode="RGBA"), 64, 48, "resize and fill").mode == "RGBA"
    assert imageops.resize_image(noise_image(40, 30, mode="L"), 64, 48, "crop and resize").mode == "L"
    assert imageops.resize_image(noise_image(40, 30).convert("LA"), 64, 48, 0).mode == "RGBA"


def test_just_resize_stretches():
    source = noise_image(120, 50)
    out = imageops.resize_image(source, 64, 96, "just resize")
    np.testing.assert_array_equal(pixels(out), pixels(source.resize((64, 96), LANCZOS)))


def test_crop_and_resize_keeps_the_centre():
    wide = noise_image(200, 100)  # same height as the target: no resampling, only the crop
    out = imageops.resize_image(wide, 100, 100, "crop and resize")
    np.testing.assert_array_equal(pixels(out), pixels(wide)[:, 50:150])
    tall = noise_image(80, 241)
    out = imageops.resize_image(tall, 80, 80, "crop and resize")
    np.testing.assert_array_equal(pixels(out), pixels(tall)[80:160])


def test_crop_and_resize_scales_to_cover():
    source = noise_image(100, 50)
    out = imageops.resize_image(source, 100, 100, "crop and resize")  # 100x50 -> 200x100, crop 50..150
    covered = source.resize((200, 100), LANCZOS)
    np.testing.assert_array_equal(pixels(out), pixels(covered)[:, 50:150])


def test_resize_and_fill_stretches_the_edge_rows_into_the_bands():
    source = noise_image(200, 100)
    out = pixels(imageops.resize_image(source, 100, 100, "resize and fill"))
    fitted = pixels(source.resize((100, 50), LANCZOS))
    np.testing.assert_array_equal(out[25:75], fitted)
    np.testing.assert_array_equal(out[:25], np.broadcast_to(fitted[0], (25, 100, 3)))
    np.testing.assert_array_equal(out[75:], np.broadcast_to(fitted[-1], (25, 100, 3)))


def test_resize_and_fill_stretches_the_edge_columns_into_the_bands():
    source = noise_image(40, 101)
    out = pixels(imageops.resize_image(source, 99, 100, "resize and fill"))
    fit_w = 40 * 100 // 101  # 39, centred at 99 // 2 - 39 // 2 = 30
    fitted = pixels(source.resize((fit_w, 100), LANCZOS))
    left, right = 30, 30 + fit_w
    np.testing.assert_array_equal(out[:, left:right], fitted)
    for column in range(left):
        np.testing.assert_array_equal(out[:, column], fitted[:, 0])
    for column in range(right, 99):
        np.testing.assert_array_equal(out[:, column], fitted[:, -1])


def test_resize_and_fill_of_same_ratio_has_no_bands():
    source = noise_image(60, 30)
    out = imageops.resize_image(source, 120, 60, "resize and fill")
    np.testing.assert_array_equal(pixels(out), pixels(source.resize((120, 60), LANCZOS)))


def test_resize_mode_names():
    assert imageops.resize_mode_name(2) == "resize and fill"
    assert imageops.resize_mode_name(" Just resize ") == "just resize"
    for bad in (3, "latent upscale", True, None):
        with pytest.raises(ValueError, match="resize mode must be one of"):
            imageops.resize_mode_name(bad)


# --- prepare_mask ----------------------------------------------------------------------------

def gradient_mask():
    return Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1)), "L")


def test_mask_is_binarised_at_128():
    out = pixels(imageops.prepare_mask(gradient_mask(), blur=0, invert=False))
    assert set(np.unique(out)) == {0, 255}
    assert (out[:, :129] == 0).all() and (out[:, 129:] == 255).all()  # A1111: 255 if v > 128


def test_invert_flips_the_binary_mask():
    plain = pixels(imageops.prepare_mask(gradient_mask(), blur=0, invert=False))
    inverted = pixels(imageops.prepare_mask(gradient_mask(), blur=0, invert=True))
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_binarise_happens_before_blur():
    grey = Image.new("L", (32, 32), 100)  # below the threshold: nothing to repaint, blur or not
    assert pixels(imageops.prepare_mask(grey, blur=4, invert=False)).max() == 0
    assert pixels(imageops.prepare_mask(grey, blur=4, invert=True)).min() == 255


def test_blur_softens_monotonically_and_symmetrically():
    mask = square_mask((64, 64), (16, 16, 48, 48))
    out = pixels(imageops.prepare_mask(mask, blur=3, invert=False))
    row = out[32]
    assert row[32] == 255 and row[0] == 0
    assert (np.diff(row[:32]) >= 0).all() and (np.diff(row[32:]) <= 0).all()
    assert 0 < row[15] < 255 and 0 < row[16] < 255  # the edge is soft on both sides
    np.testing.assert_array_equal(out, out.T)
    np.testing.assert_array_equal(out, out[::-1, ::-1])


def test_blur_matches_the_opencv_kernel():
    mask = square_mask((23, 17), (3, 2, 12, 9))
    sigma = 2
    out = pixels(imageops.prepare_mask(mask, blur=sigma, invert=False))
    # reference: cv2.GaussianBlur's kernel size and BORDER_REFLECT_101, written out naively
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    source = np.asarray(mask, dtype=np.float64)
    padded = np.pad(source, radius, mode="reflect")
    rows = sum(taps[k] * padded[:, k:k + source.shape[1]] for k in range(len(taps)))
    both = sum(taps[k] * rows[k:k + source.shape[0], :] for k in range(len(taps)))
    assert np.abs(out - np.rint(both)).max() <= 1


def test_blur_larger_than_the_image_stays_valid():
    out = pixels(imageops.prepare_mask(square_mask((8, 6), (2, 2, 4, 4)), blur=20, invert=False))
    assert out.shape == (6, 8) and 0 < out.min() <= out.max() < 255


def test_sketch_layer_alpha_is_the_mask():
    layer = np.zeros((16, 16, 4), dtype=np.uint8)  # transparent canvas, black strokes: RGB empty
    layer[4:8, 4:12, 3] = 255
    out = pixels(imageops.prepare_mask(Image.fromarray(layer, "RGBA"), blur=0, invert=False))
    expected = np.zeros((16, 16))
    expected[4:8, 4:12] = 255
    np.testing.assert_array_equal(out, expected)
    layer[4:8, 4:12, 0] = 255  # red strokes (luminance 76) still count: alpha decides
    out = pixels(imageops.prepare_mask(Image.fromarray(layer, "RGBA"), blur=0, invert=False))
    np.testing.assert_array_equal(out, expected)


def test_opaque_masks_use_luminance():
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[2:6, 2:6] = 255
    expected = np.zeros((16, 16))
    expected[2:6, 2:6] = 255
    for image in (Image.fromarray(rgb, "RGB"), Image.fromarray(rgb, "RGB").convert("RGBA")):
        np.testing.assert_array_equal(pixels(imageops.prepare_mask(image, blur=0, invert=False)), expected)
    assert imageops.prepare_mask(Image.fromarray(rgb, "RGB"), blur=0, invert=False).mode == "L"


# --- masked_crop_region ----------------------------------------------------------------------

@pytest.mark.parametrize(("mask_box", "padding", "image_size", "target"), [
    ((100, 120, 140, 150), 32, (512, 512), (512, 768)),
    ((100, 120, 140, 150), 32, (512, 512), (768, 512)),
    ((0, 0, 30, 10), 8, (300, 200), (64, 64)),     # at the corner: shifted back inside
    ((250, 150, 300, 200), 16, (300, 200), (96, 64)),
    ((10, 80, 290, 90), 0, (300, 600), (64, 128)),  # very wide mask: grows in height
])
def test_crop_region_contains_the_padded_mask_and_has_the_target_ratio(mask_box, padding, image_size, target):
    mask = square_mask(image_size, mask_box)
    x1, y1, x2, y2 = imageops.masked_crop_region(mask, padding, *image_size, *target)
    mx1, my1, mx2, my2 = mask_box
    assert x1 <= max(mx1 - padding, 0) and y1 <= max(my1 - padding, 0)
    assert x2 >= min(mx2 + padding, image_size[0]) and y2 >= min(my2 + padding, image_size[1])
    assert 0 <= x1 < x2 <= image_size[0] and 0 <= y1 < y2 <= image_size[1]
    width, height = x2 - x1, y2 - y1
    ratio = target[0] / target[1]
    assert abs(width - height * ratio) <= 1 or abs(height - width / ratio) <= 1
    assert all(isinstance(v, int) for v in (x1, y1, x2, y2))


def test_crop_region_is_centred_on_the_mask_when_there_is_room():
    mask = square_mask((512, 512), (200, 200, 260, 240))
    assert imageops.masked_crop_region(mask, 10, 512, 512, 64, 64) == (190, 180, 270, 260)


def test_crop_region_takes_the_full_side_when_the_ratio_cannot_fit():
    mask = square_mask((300, 100), (50, 40, 250, 60))
    x1, y1, x2, y2 = imageops.masked_crop_region(mask, 0, 300, 100, 64, 128)
    assert (y1, y2) == (0, 100) and (x1, x2) == (50, 250)


def test_crop_region_errors():
    with pytest.raises(ValueError, match="mask is empty"):
        imageops.masked_crop_region(Image.new("L", (64, 64)), 8, 64, 64, 64, 64)
    with pytest.raises(ValueError, match="resize the mask to the image"):
        imageops.masked_crop_region(square_mask((64, 64), (1, 1, 5, 5)), 8, 128, 64, 64, 64)


# --- paste_back / composite_masked -----------------------------------------------------------

def test_paste_back_changes_only_the_masked_pixels():
    original = noise_image(200, 150, seed=1)
    mask = imageops.prepare_mask(square_mask((200, 150), (60, 50, 100, 90)), blur=4, invert=False)
    box = imageops.masked_crop_region(mask, 16, 200, 150, 64, 64)
    generated = noise_image(64, 64, seed=2)
    out = imageops.paste_back(original, generated, box, mask)
    assert out.size == original.size and out.mode == "RGB"
    outside = pixels(mask) == 0
    np.testing.assert_array_equal(pixels(out)[outside], pixels(original)[outside])
    x1, y1, x2, y2 = box
    patch = pixels(generated.resize((x2 - x1, y2 - y1), LANCZOS))
    full = pixels(mask) == 255
    window = pixels(out)[y1:y2, x1:x2]
    np.testing.assert_array_equal(window[full[y1:y2, x1:x2]], patch[full[y1:y2, x1:x2]])
    soft = (pixels(mask) > 0) & (pixels(mask) < 255)
    assert soft.any() and (pixels(out)[soft] != pixels(original)[soft]).any()


def test_paste_back_rejects_a_box_outside_the_image():
    with pytest.raises(ValueError, match="not inside"):
        imageops.paste_back(noise_image(32, 32), noise_image(8, 8), (20, 20, 40, 40), Image.new("L", (32, 32)))


def test_composite_masked_keeps_unmasked_pixels_exactly():
    original, generated = noise_image(48, 32, seed=3), noise_image(48, 32, seed=4)
    mask_values = np.zeros((32, 48), dtype=np.uint8)
    mask_values[:, 16:32] = 255
    mask_values[:, 32:40] = 64  # soft edge
    mask = Image.fromarray(mask_values, "L")
    out = pixels(imageops.composite_masked(original, generated, mask))
    np.testing.assert_array_equal(out[:, :16], pixels(original)[:, :16])
    np.testing.assert_array_equal(out[:, 40:], pixels(original)[:, 40:])
    np.testing.assert_array_equal(out[:, 16:32], pixels(generated)[:, 16:32])
    # A1111 doubles the overlay mask: 64 blends at 128/255; gain=1 blends at 64/255
    doubled = Image.composite(generated, original, Image.new("L", (48, 32), 128))
    np.testing.assert_array_equal(out[:, 32:40], pixels(doubled)[:, 32:40])
    plain = pixels(imageops.composite_masked(original, generated, mask, gain=1.0))
    single = Image.composite(generated, original, Image.new("L", (48, 32), 64))
    np.testing.assert_array_equal(plain[:, 32:40], pixels(single)[:, 32:40])


def test_composite_masked_needs_equal_sizes():
    with pytest.raises(ValueError, match="sizes differ"):
        imageops.composite_masked(noise_image(8, 8), noise_image(16, 8), Image.new("L", (8, 8)))
