"""Random-weight Qwen2-VL / Qwen2.5-VL checkpoints that x2l builds itself, offline.

Tests and demos cannot download a real model, yet they must exercise exactly the code path a real checkpoint takes
(``from_pretrained`` of a standard HF directory: config.json, safetensors weights, tokenizer files, preprocessor
configs). So this module writes such a directory with the real architecture classes, a small byte-level BPE
tokenizer trained here on an embedded corpus, and the Qwen2-VL special tokens. The weights are random (seeded):
the model's answers are meaningless, only shapes, dtypes, token ids and compute cost are realistic.

Sizes: ``tiny`` for unit tests (fast on a 2-core CPU), ``small`` for the demo, ``medium`` for timings (the real
Qwen2-VL-2B language-model layer widths, only 4 layers, and a shallow vision tower of real width).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from x2l.errors import ConfigError
from x2l.models.registry import FAMILIES as REGISTERED
from x2l.testing.checkpoints import DEFAULT_DTYPE as DEFAULT_DTYPE  # re-exported: every builder's sizes and dtypes
from x2l.testing.checkpoints import PROCESSOR_STEPS, TEXT_WIDTHS, check_size, save_checkpoint
from x2l.testing.checkpoints import SIZES as SIZES

# The registered families this module builds (registry.Family.tiny_builder), by their config.json model_type.
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
FAMILIES = tuple(f.name for f in REGISTERED if f.model_type in MODEL_TYPES)

# The Qwen2-VL special tokens, in the order the real tokenizer numbers them (there they start at 151643; here they
# follow the BPE vocabulary, so they are also the last ids, as in the real tokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
BPE_VOCAB_SIZE = 1024 - len(SPECIAL_TOKENS)  # an upper bound: the embedded corpus decides how many merges exist

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX): digits are single tokens, words keep
# their leading space. Using the same split means a Qwen2Tokenizer rebuilt from our vocab/merges tokenizes alike.
# The regex as Qwen2's tokenizer.json spells it.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# The chat template shipped with Qwen2-VL-*-Instruct (the same for Qwen2.5-VL).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the BPE merges: the words a video-QA prompt uses, so prompts tokenize compactly. Every line is
# used once; byte-level BPE still encodes any other text (byte by byte at worst).
CORPUS = """\
Select the best answer to the following multiple-choice question based on the video.
Respond with only the letter (A, B, C, D, or E) of the correct option.
Answer with the option's letter from the given choices directly.
The best answer is: A
The best answer is: B
The best answer is: C
The best answer is: D
The best answer is: E
Question: What color is the ball? Options: A. red B. blue C. green D. yellow E. white
What color is the car in the video? A. black B. white C. red D. blue E. gray
What color is the shirt of the man who is talking? A. orange B. purple C. pink D. brown E. green
What is the person holding in their hand? A. a cup B. a phone C. a book D. a knife E. a bag
What object is on the table at the end of the video? A. a box B. a bottle C. a plate D. a lamp E. a toy
How many people appear in the video? A. 1 B. 2 C. 3 D. 4 E. 5
How many times does the dog jump? A. 0 B. 6 C. 7 D. 8 E. 9
How many cars are parked on the street? A. 10 B. 12 C. 15 D. 20 E. 25
When does the woman open the door? A. at the beginning B. in the middle C. at the end D. never E. twice
What happens after the man sits down? A. he reads B. he eats C. he sleeps D. he leaves E. he laughs
At what time does the video show the clock? A. 00:15 B. 01:30 C. 02:45 D. 03:00 E. 04:10
Which of the following is true about the video? Which animal appears first? Which scene comes last?
Where does the video take place? A. in a kitchen B. in a park C. on a beach D. in an office E. on a road
Why does the child start to cry? What is the main topic of the video? What is the man doing?
The video shows a red ball rolling across a green field. A blue car drives past a white house.
A woman in a yellow dress walks her brown dog along the river in the morning light.
Two children count the apples in a basket: one, two, three, four, five, six, seven, eight, nine, ten.
The first frame shows a black cat; in the second frame the cat is gone, and in the third frame it returns.
At the start of the clip the sky is orange; by the end of the clip it is dark and the lights are on.
The chef cuts the onions, then the carrots, and finally puts everything into a large pot on the stove.
Objects in the scene: table, chair, cup, phone, book, box, bottle, plate, lamp, window, door, bag, toy, clock.
Colors: red, orange, yellow, green, blue, purple, pink, brown, black, white, gray, gold, silver.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 30 45 60 90 100 2024 1.5 3.25 seconds minutes hours frames.
Time: before, after, during, while, first, second, third, then, next, finally, early, late, today, yesterday.
The video is 12 minutes long. At 03:20 the speaker points to the screen and explains the chart.
The man in the gray jacket picks up the phone, looks at the screen, and puts it back in his pocket.
The camera moves from left to right, showing the players on the field and the crowd in the stands.
In the video, the number of birds on the wire increases from three to seven over ten seconds.
Summarize the video. Describe what you see. Count the objects. Track the person across frames.
The answer is A. The answer is B. The answer is C. The answer is D. The answer is E.
system
user
assistant
system
user
assistant
You are a helpful assistant. You are a helpful assistant that watches videos.
Please watch the video carefully and answer the question. Think about what happens in each frame.
The subtitles say: "Welcome back to the channel, today we are going to cook a simple dinner."
A man rides a bicycle down a hill, a girl throws a frisbee, and a bird flies over the water.
The light turns green, the people cross the road, and a bus stops at the corner of the street.
In the last scene, the team celebrates the goal while the score on the screen changes to 2 to 1.
The woman writes the numbers 7, 14, 21 and 28 on the board and asks the students to find the pattern.
What is the total number of objects on the shelf? How long does the video last? Who speaks first?
What color are the flowers in the garden? Which object is to the left of the red box?
Select the best answer to the following multiple-choice question based on the video's content.
Answer with the option's letter from the given choices directly. Based on the video, answer directly.
"""

# Per-size widths. `mrope` splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
_TEXT = {
    "tiny": dict(TEXT_WIDTHS["tiny"], mrope=[2, 3, 3]),
    "small": dict(TEXT_WIDTHS["small"], mrope=[8, 12, 12]),
    # Qwen2-VL-2B's language model widths, 4 of its 28 layers.
    "medium": dict(
        hidden_size=1536,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        mrope=[16, 24, 24],
    ),
}
# Vision towers. depth_25/fullatt_25: Qwen2.5-VL uses window attention except in `fullatt_block_indexes`, so its tiny
# tower has two blocks (one windowed, one full). mlp_25: Qwen2.5-VL's SwiGLU width (3420 in the real 1280-wide tower).
_VISION = {
    "tiny": dict(depth=1, depth_25=2, embed_dim=32, num_heads=2, mlp_ratio=4, mlp_25=128),
    "small": dict(depth=2, depth_25=2, embed_dim=128, num_heads=4, mlp_ratio=4, mlp_25=512),
    "medium": dict(depth=2, depth_25=2, embed_dim=1280, num_heads=16, mlp_ratio=4, mlp_25=3420),
}
# Pixel budgets per frame for the video preprocessor (tiny keeps unit-test videos to a few patches).
_PIXELS = {
    "tiny": (56 * 56, 112 * 112),
    "small": (128 * 28 * 28, 28 * 28 * 768),
    "medium": (128 * 28 * 28, 28 * 28 * 768),
}

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _check(family: str, size: str) -> str:
    """The family's model_type; ConfigError for a family this module does not build or an unknown size."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    check_size(size)
    return next(f.model_type for f in REGISTERED if f.name == family)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on CORPUS; the same merges every call (BpeTrainer is deterministic).

    Byte-level pre-tokenizer and decoder with no normalizer, so decode(encode(s)) == s for any string.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids len(bpe) .. len(bpe)+7, in SPECIAL_TOKENS order
    # transformers 5: PreTrainedTokenizerFast is TokenizersBackend, saved as tokenizer_class "TokenizersBackend",
    # which AutoTokenizer loads from tokenizer.json as is (Qwen2Tokenizer would add an NFC normalizer).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The ids a config needs, looked up in the tokenizer (so config and tokenizer cannot disagree)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def tiny_config(family: str, size: str, vocab_size: int, special_ids: dict[str, int]) -> PreTrainedConfig:
    """A Qwen2VLConfig / Qwen2_5_VLConfig of the given size whose token ids are `special_ids` (see
    special_token_ids)."""
    model_type = _check(family, size)
    t, v = _TEXT[size], _VISION[size]
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    assert sum(t["mrope"]) * 2 == head_dim, (size, head_dim)
    text_config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"],
        "max_position_embeddings": 32768,
        "max_window_layers": t["num_hidden_layers"],  # as real checkpoints; sliding window is off anyway
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "mrope_section": list(t["mrope"]), "rope_theta": 1_000_000.0},
        "bos_token_id": special_ids["bos_token_id"],
        "eos_token_id": special_ids["eos_token_id"],
        "pad_token_id": special_ids["pad_token_id"],
    }
    common = dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_heads=v["num_heads"])
    ids = {
        k: special_ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    if model_type == "qwen2_vl":
        vision_config = dict(
            common, depth=v["depth"], embed_dim=v["embed_dim"], mlp_ratio=v["mlp_ratio"], hidden_size=t["hidden_size"]
        )
        return Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **ids)
    depth = v["depth_25"]
    vision_config = dict(
        common,
        depth=depth,
        hidden_size=v["embed_dim"],
        intermediate_size=v["mlp_25"],
        out_hidden_size=t["hidden_size"],
        tokens_per_second=2,
        window_size=112,
        fullatt_block_indexes=[depth - 1],
    )
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **ids)


def model_class(family: str) -> type[PreTrainedModel]:
    """The transformers class a checkpoint of `family` is built and loaded with."""
    model_type = _check(family, "tiny")
    return Qwen2VLForConditionalGeneration if model_type == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration


def preprocessor_config(family: str, size: str) -> dict[str, Any]:
    """The Qwen2-VL image/video processor settings x2l reads to do its own pixel preprocessing."""
    model_type = _check(family, size)
    min_pixels, max_pixels = _PIXELS[size]
    return {
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "min_pixels": min_pixels,  # the pre-`size` spelling, still present in real checkpoints
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        **PROCESSOR_STEPS,
        "processor_class": "Qwen2VLProcessor" if model_type == "qwen2_vl" else "Qwen2_5_VLProcessor",
    }


def write_tiny_checkpoint(
    out_dir: str | Path,
    family: str = FAMILIES[0],
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a random-weight checkpoint in the standard HF layout to `out_dir`; return its path.

    Weights depend only on (family, size, seed, dtype): writing twice gives byte-identical safetensors.
    dtype None means DEFAULT_DTYPE[size] (float32, except bfloat16 for medium). save_pretrained stores the weights
    under the real hub checkpoints' keys (model.layers.*, visual.*, lm_head.weight), not the module paths.
    """
    _check(family, size)
    tokenizer = build_tokenizer()
    config = tiny_config(family, size, len(tokenizer), special_token_ids(tokenizer))
    pre = preprocessor_config(family, size)
    files = {
        "preprocessor_config.json": dict(pre, image_processor_type="Qwen2VLImageProcessor"),
        "video_preprocessor_config.json": dict(pre, video_processor_type="Qwen2VLVideoProcessor"),
    }
    cls = model_class(family)
    return save_checkpoint(
        out_dir, family, size, seed, dtype, __name__, model_class=cls, config=config, tokenizer=tokenizer, files=files
    )
