"""`generate`'s per-adapter flags and its JSON settings file.

Per-adapter flags: `--adapter FILE` starts an adapter; the `--image`, `--negative-image`, `--mask` (repeatable),
`--scale`, `--weight-type`, `--composition-weight`, `--boost`, `--combine` and `--embeds-scaling` after it belong
to it (those before the first `--adapter`, to the first one):

    --adapter plus.safetensors --image a.png --image b.png --mask left.png --mask right.png --scale 0.7 \\
    --adapter face.bin --image face.png --scale '{"up": {"block_0": [0.0, 1.0, 0.0]}}' --embeds-scaling k_v

`--settings FILE`: a JSON object whose keys are the flags' long names (dashes or underscores), e.g.
`{"base": "MODEL_DIR", "steps": 30, "prompt": ["a", "b"], "adapters": [{"adapter": "plus.safetensors",
"image": ["a.png", "b.png"], "mask": ["l.png", "r.png"], "scale": 0.7}, ...]}`. Its settings come first and the
command line's flags after them: a single-valued flag on the command line wins, repeatable ones add up.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipadapter_jax.choices import EMBEDS_SCALING, IMAGE_COMBINE_MODES, WEIGHT_TYPES
from ipadapter_jax.cli.main import UsageError, finite_float

PER_ADAPTER_LISTS = {"--image": "images", "--negative-image": "negative_images", "--mask": "masks"}
PER_ADAPTER_FILES = {"--face-embeds": "face_embeds"}  # one file per adapter, kept as a list of 0 or 1
PER_ADAPTER_VALUES = {
    "--adapter": "file",
    "--scale": "scale",
    "--weight-type": "weight_type",
    "--composition-weight": "composition_weight",
    "--boost": "boost",
    "--s-scale": "s_scale",
    "--combine": "combine",
    "--embeds-scaling": "embeds_scaling",
}


class PerAdapter(argparse.Action):
    """Stores into `namespace.adapters`, a list of dicts, one per `--adapter`: "file", "images",
    "negative_images", "masks" and the other `PER_ADAPTER_VALUES` given."""

    def __call__(self, parser: Any, namespace: Any, value: Any, option: str | None = None) -> None:
        groups = getattr(namespace, "adapters", None) or []
        if not groups or (option == "--adapter" and "file" in groups[-1]):
            groups.append({})
        group = groups[-1]
        if option in PER_ADAPTER_LISTS:
            group.setdefault(PER_ADAPTER_LISTS[option], []).append(value)
        elif option in PER_ADAPTER_FILES:
            if PER_ADAPTER_FILES[option] in group:
                raise UsageError(f"{option} given twice for adapter {len(groups) - 1}; one per --adapter")
            group[PER_ADAPTER_FILES[option]] = [value]
        else:
            key = PER_ADAPTER_VALUES[option]
            if key in group:
                raise UsageError(f"{option} given twice for adapter {len(groups) - 1}; one per --adapter")
            group[key] = value
        namespace.adapters = groups


def add_per_adapter_flags(group: Any) -> None:
    """The per-adapter flags on an argparse group (dest: `adapters`)."""
    group.add_argument("--adapter", action=PerAdapter, dest="adapters", help="IP-Adapter file; repeat for several")
    group.add_argument("--image", action=PerAdapter, dest="adapters", help="image prompt of the last --adapter")
    group.add_argument("--negative-image", action=PerAdapter, dest="adapters", help="negative image prompt")
    group.add_argument("--mask", action=PerAdapter, dest="adapters", help="mask of one --image (regional)")
    group.add_argument(
        "--face-embeds",
        action=PerAdapter,
        dest="adapters",
        help="FaceID adapters: .npy of identity embeddings, (K, 512) float32 (insightface, see README); replaces "
        "--image for FaceID, goes with it (the face crop) for FaceID Plus",
    )
    group.add_argument(
        "--s-scale",
        action=PerAdapter,
        dest="adapters",
        type=finite_float,
        help="FaceID Plus v2's shortcut scale (default: 1.0 for a file named *plusv2*, else no shortcut)",
    )
    group.add_argument(
        "--scale",
        action=PerAdapter,
        dest="adapters",
        help='a number or a JSON per-block dict, e.g. \'{"up": {"block_0": [0.0, 1.0, 0.0]}}\' (default 1.0)',
    )
    group.add_argument(
        "--weight-type",
        action=PerAdapter,
        dest="adapters",
        choices=WEIGHT_TYPES,
        help="per-layer scale preset (style-transfer, composition, ease-in, ...), times --scale (a number)",
    )
    group.add_argument(
        "--composition-weight",
        action=PerAdapter,
        dest="adapters",
        type=finite_float,
        help="composition layers' weight of --weight-type style-and-composition / strong-style-and-composition "
        "(default 1)",
    )
    group.add_argument(
        "--boost",
        action=PerAdapter,
        dest="adapters",
        type=finite_float,
        help="weight of the swapped layers of --weight-type style-transfer-precise / composition-precise "
        "(ComfyUI's style_boost / composition_boost; default: --scale)",
    )
    group.add_argument(
        "--combine",
        action=PerAdapter,
        dest="adapters",
        choices=IMAGE_COMBINE_MODES,
        help="several --image -> one adapter input: concat (their tokens, default), add, subtract, average, "
        "norm-average",
    )
    group.add_argument("--embeds-scaling", action=PerAdapter, dest="adapters", choices=EMBEDS_SCALING)


def adapter_settings(groups: list[dict] | None) -> list[dict]:
    """The parsed groups, checked and completed: scale parsed (a `ScalePreset` with --weight-type), defaults
    (scale 1.0, "v_only", "concat") filled in."""
    if not groups:
        raise UsageError("--adapter and --image are required")
    checked = []
    for index, group in enumerate(groups):
        name = f"adapter {index} ({group.get('file', 'no file')})"
        if "file" not in group:
            raise UsageError(f"{name}: --image/--scale/... given but no --adapter FILE")
        if not group.get("images") and "face_embeds" not in group:
            raise UsageError(f"{name} has no --image (or --face-embeds, for a FaceID adapter)")
        if "face_embeds" in group and group.get("negative_images"):
            raise UsageError(
                f"{name}: --negative-image does not go with --face-embeds (FaceID's negative is the zero embedding)"
            )
        masks = group.get("masks", [])
        if masks and len(masks) != len(group["images"]):
            raise UsageError(f"{name}: {len(masks)} --mask for {len(group['images'])} --image; one per image")
        checked.append(
            dict(
                group,
                images=group.get("images", []),
                negative_images=group.get("negative_images", []),
                face_embeds=group.get("face_embeds", []),
                masks=masks,
                scale=_scale(name, group),
                embeds_scaling=group.get("embeds_scaling", "v_only"),
                combine=group.get("combine", "concat"),
            )
        )
    return checked


def _scale(name: str, group: dict) -> Any:
    """The adapter's --scale, or with --weight-type the `ScalePreset` it names, weighted by --scale."""
    from ipadapter_jax.models.scale_presets import ScalePreset

    scale = _parse_scale(group.get("scale", "1.0"))
    if "weight_type" not in group:
        for key in ("composition_weight", "boost"):
            if key in group:
                raise UsageError(f"{name}: --{key.replace('_', '-')} needs --weight-type")
        return scale
    if not isinstance(scale, float):
        raise UsageError(f"{name}: --weight-type takes --scale as a number (its weight), got {group['scale']!r}")
    try:
        return ScalePreset(group["weight_type"], scale, group.get("composition_weight"), group.get("boost"))
    except ValueError as err:
        raise UsageError(f"{name}: {err}") from None


def expand_settings_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`argv` with `--settings FILE` replaced by the flags its JSON object stands for (placed first)."""
    argv = list(argv)
    if "--settings" not in argv:
        return argv
    at = argv.index("--settings")
    if at + 1 >= len(argv):
        raise UsageError("--settings needs a JSON file")
    path = argv[at + 1]
    rest = argv[:at] + argv[at + 2 :]
    try:
        settings = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"--settings {path}: not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise UsageError(f"--settings {path}: must hold a JSON object, got {type(settings).__name__}")
    flags = {opt: action for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    tokens: list[str] = []
    for key, value in settings.items():
        if key == "adapters":
            if not isinstance(value, list) or not all(isinstance(g, dict) for g in value):
                raise UsageError(f"--settings {path}: 'adapters' must be a list of objects")
            for group in value:
                adapter = {"adapter": group.get("adapter")} if "adapter" in group else {}
                for inner_key, inner_value in {**adapter, **group}.items():
                    tokens += _flag_tokens(path, flags, inner_key, inner_value, per_adapter=True)
        else:
            tokens += _flag_tokens(path, flags, key, value, per_adapter=False)
    return tokens + rest


def _flag_tokens(path: str, flags: dict, key: str, value: Any, per_adapter: bool) -> list[str]:
    flag = "--" + key.replace("_", "-")
    action = flags.get(flag)
    if action is None or flag == "--settings" or (per_adapter and not isinstance(action, PerAdapter)):
        where = "an 'adapters' entry" if per_adapter else "the top level"
        raise UsageError(f"--settings {path}: unknown key {key!r} at {where}")
    if isinstance(action, argparse._StoreTrueAction):
        return [flag] if value else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, list) and action.nargs not in (None, "?"):
        return [flag, *map(str, value)]
    values = value if isinstance(value, list) else [value]
    return [token for item in values for token in (flag, str(item))]


def _parse_scale(text: str) -> float | dict:
    try:
        return finite_float(text)
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"--scale {err}") from None
    except ValueError:
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"--scale must be a number or a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--scale must be a number or a JSON object, got {text!r}")
    return value
