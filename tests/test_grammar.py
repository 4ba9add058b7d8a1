"""The /draw grammar: flags, presets, every refusal, and property tests over arbitrary input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.domain import DrawRequest, ModelProfile
from bot.errors import RequestError
from bot.grammar import Limits, RawOptions, build_request, find_blocked, parse_draw, split_flags

ZIMAGE = ModelProfile(
    name="z-image-turbo",
    family="z-image",
    default_width=1024,
    default_height=1024,
    default_steps=8,
    default_guidance=0.0,
    size_multiple=16,
    sizes={"square": (1024, 1024), "portrait": (896, 1152), "landscape": (1152, 896), "wide": (1360, 768)},
)
SDXL = ModelProfile(
    name="sdxl",
    family="sdxl",
    default_width=1024,
    default_height=1024,
    default_steps=30,
    default_guidance=5.0,
    size_multiple=8,
)
LIMITS = Limits(max_steps=50, max_images=4, max_pixels=2 * 1024 * 1024, max_prompt_chars=200)


def parse(text: str, profile: ModelProfile = ZIMAGE, limits: Limits = LIMITS) -> DrawRequest:
    return parse_draw(text, profile, limits)


def test_full_example() -> None:
    r = parse("a red fox in snow --ar 16:9 --seed 42 --steps 8 --n 2 --no blurry, text --cfg 1.5")
    assert r.prompt == "a red fox in snow"
    assert r.negative_prompt == "blurry, text"
    assert (r.steps, r.count, r.seed, r.guidance) == (8, 2, 42, 1.5)
    assert r.width % 16 == 0 and r.height % 16 == 0
    assert abs(r.width / r.height - 16 / 9) < 0.05
    assert r.seeds(0) == (42, 43)
    assert r.notes == ()


def test_defaults_come_from_the_model() -> None:
    r = parse("a cat")
    assert (r.width, r.height, r.steps, r.guidance, r.count, r.seed) == (1024, 1024, 8, 0.0, 1, None)
    s = parse("a cat", SDXL)
    assert (s.steps, s.guidance) == (30, 5.0)


def test_size_flag_and_presets() -> None:
    assert (parse("x --size 768x1024").width, parse("x --size 768x1024").height) == (768, 1024)
    assert (parse("x --size wide").width, parse("x --size wide").height) == (1360, 768)
    assert parse("x --size 1000x1000", SDXL).width == 1000  # multiple of 8 is fine for SDXL


def test_chinese_prompt() -> None:
    r = parse("一只在雪地里的红狐狸 --seed 7")
    assert r.prompt == "一只在雪地里的红狐狸" and r.seed == 7


def test_phone_dashes_are_flags() -> None:
    assert parse("a fox —seed 5").seed == 5
    assert parse("a fox –n 2").count == 2


def test_dashes_inside_words_are_prompt() -> None:
    assert parse("state-of-the-art robot--shiny").prompt == "state-of-the-art robot--shiny"


def test_negative_without_guidance_is_told_not_ignored() -> None:
    r = parse("a fox --no blurry")
    assert r.negative_prompt == "blurry"
    assert r.notes and "no effect" in r.notes[0] and "--cfg" in r.notes[0]


def test_default_negative_applies_only_with_guidance() -> None:
    limits = Limits(default_negative_prompt="lowres")
    assert parse("a fox", limits=limits).negative_prompt == ""
    assert parse("a fox --cfg 2", limits=limits).negative_prompt == "lowres"
    assert parse("a fox --cfg 2 --no text", limits=limits).negative_prompt == "text"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "prompt is empty"),
        ("   --seed 3", "prompt is empty"),
        ("x" * 201, "limit is 200"),
        ("x --steps 0", "--steps 0 is out of range: allowed 1–50"),
        ("x --steps 51", "--steps 51 is out of range: allowed 1–50"),
        ("x --steps 8.5", "--steps 8.5 is not a whole number"),
        ("x --n 5", "--n 5 is out of range: allowed 1–4"),
        ("x --n 0", "--n 0 is out of range"),
        ("x --seed -1", "--seed -1 is out of range: allowed 0–4294967295"),
        ("x --seed 4294967296", "out of range"),
        ("x --seed abc", "--seed abc is not a whole number"),
        ("x --cfg 21", "--cfg 21 is out of range: allowed 0–20"),
        ("x --cfg -1", "--cfg -1 is out of range"),
        ("x --cfg nan", "--cfg nan is not a number"),
        ("x --size 1000x1000", "multiples of 16"),
        ("x --size 0x1024", "multiples of 16"),
        ("x --size 2048x2048", "at most 2,097,152 pixels"),
        ("x --size huge", "--size huge is not a size"),
        ("x --ar 0:1", "--ar 0:1 is not an aspect ratio"),
        ("x --ar 10:1", "--ar 10:1 is too extreme"),
        ("x --ar wide", "is not an aspect ratio"),
        ("x --ar 1:1 --size 512x512", "either --size or --ar"),
        ("x --seed 1 --seed 2", "--seed is given twice"),
        ("x --foo 3", "unknown flag --foo"),
        ("x --no", "--no needs text"),
        ("x --steps", "--steps (empty) is not a whole number"),
    ],
)
def test_refusals_name_flag_value_and_range(text: str, needle: str) -> None:
    with pytest.raises(RequestError) as info:
        parse(text)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_typed_options_from_a_form_are_validated_too() -> None:
    r = build_request(RawOptions(prompt="a fox", steps=4, count=2, seed=9, guidance=1.0), ZIMAGE, LIMITS)
    assert (r.steps, r.count, r.seed, r.guidance) == (4, 2, 9, 1.0)
    with pytest.raises(RequestError, match="--steps 99"):
        build_request(RawOptions(prompt="a fox", steps=99), ZIMAGE, LIMITS)


def test_blocked_words() -> None:
    assert find_blocked("A Gory scene", ["gory"]) == "gory"
    assert find_blocked("category theory", ["gory"]) is None  # whole words only for Latin text
    assert find_blocked("一个暴力的场景", ["暴力"]) == "暴力"
    assert find_blocked("fine", ["", "  "]) is None


def test_split_flags_keeps_raw_values() -> None:
    raw = split_flags("fox --n 2 --no a, b --ar 3:2")
    assert (raw.prompt.strip(), raw.count, raw.negative, raw.ar) == ("fox", "2", "a, b", "3:2")


flag_words = st.sampled_from(
    [
        "--ar",
        "--seed",
        "--steps",
        "--n",
        "--no",
        "--cfg",
        "--size",
        "--strength",
        "0.6",
        "—seed",
        "--x",
        "--",
        "-",
        "x",
        "16:9",
        "0",
        "-3",
        "1e9",
    ]
)
fragments = st.one_of(st.text(max_size=12), flag_words, st.integers(-10, 10**10).map(str))


@settings(max_examples=400, deadline=None)
@given(st.lists(fragments, max_size=12).map(" ".join))
def test_any_input_gives_a_valid_request_or_a_clean_error(text: str) -> None:
    for profile in (ZIMAGE, SDXL):
        try:
            r = parse(text, profile)
        except RequestError as err:
            assert str(err) and "\n" not in str(err)
            continue
        assert r.prompt and len(r.prompt) <= LIMITS.max_prompt_chars
        assert r.width % profile.size_multiple == 0 and r.height % profile.size_multiple == 0
        assert r.width * r.height <= LIMITS.max_pixels
        assert 1 <= r.steps <= LIMITS.max_steps and 1 <= r.count <= LIMITS.max_images
        assert r.seed is None or 0 <= r.seed < 2**32
        assert 0 <= r.guidance <= profile.max_guidance
        assert DrawRequest.from_json(r.to_json()) == r


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_arbitrary_unicode_never_raises_anything_else(text: str) -> None:
    try:
        parse(text)
    except RequestError:
        pass
