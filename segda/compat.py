"""Everything segda does to read what older versions wrote, in one place: each branch names the version whose
files it reads, so it can be dropped when that version is no longer supported.

- Checkpoints (state.json) of segda < 0.5 kept the loop's counters at the top level and the data order inside the
  data position; segda < 0.2 recorded no data position at all (refused: the step alone cannot say which samples
  a run read shard by shard).
- Configs and checkpoints of segda < 0.3 wrote sizes as lists (see `segda.config.old_size_list`).
"""

from __future__ import annotations

from segda.log import SegdaError

_TRAIN_COUNTERS = ("best", "images", "train_seconds", "data_wait_seconds", "nonfinite_skipped")


def upgrade_checkpoint_state(state: dict) -> dict:
    """A checkpoint's state.json in the current layout: {step, stage, world_size, config, data_order, train: {...},
    scheduler, data, [scaler], [base_fingerprint]}."""
    if "train" in state and "data_order" in state:
        return state
    state = dict(state)
    # segda < 0.5: counters at the top level, and the order in which the position counts inside it
    state["train"] = {"step": state.get("step", 0), **{k: state.pop(k) for k in _TRAIN_COUNTERS if k in state}}
    data = dict(state.get("data") or {})
    if not data:
        raise SegdaError("this checkpoint was written by segda < 0.2, which recorded no data position: finish the "
                         "run with that version, or start a new run with another --out")
    state["data_order"] = data.pop("order", "by_shard")
    state["data"] = data
    if state["data_order"] != "by_sample":
        raise SegdaError("this checkpoint was written reading its shards one after another (a manifest without "
                         "byte offsets, or data.verify, in segda < 0.5); segda now reads every dataset sample by "
                         "sample, so its data position means other samples: finish the run with that version, or "
                         "start a new run with another --out")
    if state.get("scaler") is None:
        state.pop("scaler", None)
    return state


# segda < 0.3 wrote sizes as lists, in two orders: crop_size [height, width] beside base_size and eval_size
# [width, height]. A list is refused with the exact text to write instead, computed from the order it was written in.
_OLD_LIST_ORDER = {"crop_size": "hw", "base_size": "wh", "eval_size": "wh"}


def old_size_list(name: str, value) -> str | None:
    """The WIDTHxHEIGHT text of a size list written by segda < 0.3 (None if `value` is not one)."""
    if name in _OLD_LIST_ORDER and isinstance(value, list) and len(value) == 2 and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        w, h = value if _OLD_LIST_ORDER[name] == "wh" else value[::-1]
        return f"{w}x{h}"
    return None


def size_list_fix(name: str, value, what: str, migrated: str) -> str:
    """What to write instead of an old size list, and why its numbers changed places."""
    order = "width, height" if _OLD_LIST_ORDER[name] == "wh" else "height, width"
    fix = f"{what}={migrated}" if what.startswith("--set ") else f"{name}: {migrated}"
    return f"write {fix} (the list {value} was [{order}], the old convention of this key)"


RETIRED_KEYS = {"data.shuffle_buffer": "segda reads every dataset sample by sample now, shuffled over the whole "
                                        "dataset each epoch"}
"""Config keys older recipes may hold that no longer do anything: accepted with a warning, then dropped."""


def is_retired(dotted: str) -> bool:
    if dotted in RETIRED_KEYS:
        from segda.log import warn

        warn(f"config key {dotted} is no longer used ({RETIRED_KEYS[dotted]}): remove it")
        return True
    return False


def drop_retired(raw: dict, source: str) -> dict:
    """`raw` (a config file's mapping) without the retired keys, each announced."""
    out = {}
    for section, fields in raw.items():
        if isinstance(fields, dict):
            fields = {k: v for k, v in fields.items() if not is_retired(f"{section}.{k}")}
        out[section] = fields
    return out
