import torch

from fewstep.models.text import Tokenizer
from fewstep.training.data import (
    COLOR_NAMES,
    PALETTE,
    TEMPLATES,
    caption,
    caption_vocabulary,
    random_colors,
    render,
    sample_batch,
    synthetic_digits,
    to_uint8,
    to_unit,
)


def test_palette_is_exactly_the_benchmarks():
    assert PALETTE == {
        "black": (0, 0, 0),
        "white": (255, 255, 255),
        "red": (220, 40, 40),
        "green": (40, 180, 60),
        "blue": (40, 80, 220),
        "yellow": (240, 220, 40),
        "orange": (250, 140, 30),
        "purple": (140, 60, 200),
        "cyan": (40, 200, 220),
        "gray": (128, 128, 128),
    }


def test_render_blends_exact_colors_and_pads():
    alpha = torch.zeros(3, 28, 28)
    alpha[:, 10, 10] = 1.0
    alpha[:, 11, 11] = 0.25
    fg = torch.tensor([COLOR_NAMES.index("red"), COLOR_NAMES.index("white"), COLOR_NAMES.index("cyan")])
    bg = torch.tensor([COLOR_NAMES.index("black"), COLOR_NAMES.index("blue"), COLOR_NAMES.index("gray")])
    img = render(alpha, fg, bg)
    assert img.shape == (3, 3, 32, 32)
    for i in range(3):
        f = torch.tensor(PALETTE[COLOR_NAMES[fg[i]]], dtype=torch.float32)
        b = torch.tensor(PALETTE[COLOR_NAMES[bg[i]]], dtype=torch.float32)
        assert torch.equal(img[i, :, 12, 12], f)  # (10, 10) + padding 2
        assert torch.equal(img[i, :, 0, 0], b)  # padding is background
        assert torch.allclose(img[i, :, 13, 13], 0.75 * b + 0.25 * f)
    # round trip through the model range is exact for palette colors
    u8 = to_uint8(to_unit(img))
    assert torch.equal(u8.permute(0, 3, 1, 2).float(), img.round())


def test_colors_always_differ_and_cover_all_pairs():
    fg, bg = random_colors(5000, torch.Generator().manual_seed(0))
    assert bool((fg != bg).all())
    assert len(set(zip(fg.tolist(), bg.tolist(), strict=True))) == 90


def test_both_required_phrasings():
    red, black = COLOR_NAMES.index("red"), COLOR_NAMES.index("black")
    assert caption(7, red, black) == "a red 7 on black"
    assert caption(7, red, black, template=1, as_word=True) == "seven in red on a black background"
    assert TEMPLATES[:2] == ["a {fg} {digit} on {bg}", "{digit} in {fg} on a {bg} background"]


def test_batches_are_deterministic_and_captions_match_labels():
    digits = synthetic_digits(64)
    a = sample_batch(digits, 8, torch.Generator().manual_seed(3))
    b = sample_batch(digits, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    for cap, f, g in zip(a.captions, a.fg, a.bg, strict=True):
        assert COLOR_NAMES[f] in cap and COLOR_NAMES[g] in cap


def test_tokenizer_maps_unknown_words_to_unk_and_pads():
    tok = Tokenizer(caption_vocabulary(), max_length=8)
    ids, mask = tok.encode(["a red 7 on black", "a MAUVE 7 on black!", ""])
    assert ids.shape == (3, 8) and mask.dtype == torch.bool
    unk = tok.index["[UNK]"]
    assert ids[0].tolist()[:6] == [tok.index[w] for w in ["[BOS]", "a", "red", "7", "on", "black"]]
    assert ids[1, 2] == unk and (ids[0, 2] != unk)  # mauve is unknown, case and punctuation ignored
    assert mask[0].tolist() == [True] * 6 + [False] * 2
    assert mask[2].tolist() == [True] + [False] * 7  # the empty caption is BOS alone
    long_ids, long_mask = tok.encode(["a " * 50])
    assert long_ids.shape == (1, 8) and bool(long_mask.all())
    assert Tokenizer.from_json(tok.to_json()).vocab == tok.vocab
