"""The model card (README.md) written into every complete checkpoint folder: what the model is, where it
came from, the settings that made it, its final metrics and how to load it. Built from the registry entry."""

from __future__ import annotations

from pathlib import Path

from rlhf.pipeline.registry import Entry

FILE = "README.md"

_WHAT = {
    "base": "The pipeline's starting model.",
    "sft": "A causal language model fine-tuned on demonstrations (supervised fine-tuning).",
    "collect": "Ranked comparisons of responses sampled from the parent policy, for the next round's reward model: "
               "`comparisons.jsonl` (training) and `eval_comparisons.jsonl` (held-out prompts).",
    "rm": "A reward model: a sequence classifier with one output, the scalar reward, trained on ranked pairs.",
    "ppo": "A policy optimised against the reward model by PPO (its value model in `value_model/`) or, per its "
           "`algorithm` setting, by GRPO, RLOO or REINFORCE++ (no value model).",
    "dpo": "A policy optimised with DPO on the ranked pairs, the SFT policy as its reference.",
}

_LOAD = {
    "base": "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(FOLDER)\ntokenizer = AutoTokenizer.from_pretrained(FOLDER)",
    "sft": "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
           "model = AutoModelForCausalLM.from_pretrained(FOLDER)\ntokenizer = AutoTokenizer.from_pretrained(FOLDER)",
    "rm": "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
          "reward_model = AutoModelForSequenceClassification.from_pretrained(FOLDER)  # logits[:, 0] is the reward\n"
          "tokenizer = AutoTokenizer.from_pretrained(FOLDER)\n"
          "# reward_stats.json holds the mean and std of its scores on the eval split (PPO normalises with them)",
    "ppo": "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer\n\n"
           "policy = AutoModelForCausalLM.from_pretrained(FOLDER)\ntokenizer = AutoTokenizer.from_pretrained(FOLDER)\n"
           "value_model = AutoModelForSequenceClassification.from_pretrained(FOLDER + \"/value_model\")  # PPO only",
    "dpo": "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
           "model = AutoModelForCausalLM.from_pretrained(FOLDER)\ntokenizer = AutoTokenizer.from_pretrained(FOLDER)",
}


def render(entry: Entry, *, parents: list[Entry], metrics: dict) -> str:
    """The card's Markdown text."""
    section = entry.config.get(entry.stage, {}) if isinstance(entry.config, dict) else {}
    lines = [f"# {entry.pipeline} · {entry.stage} · {entry.id}", "", _WHAT.get(entry.stage, ""), ""]
    facts = [("stage", entry.stage), ("pipeline", entry.pipeline), ("pipeline run", entry.run or "-"),
             ("round", entry.round),
             ("created (UTC)", entry.created_at), ("model", entry.config.get("model", "-")),
             ("seed", entry.config.get("seed", "-")), ("mode", section.get("mode", "-")),
             ("data", _data(section)), ("data fingerprint", entry.data_fingerprint or "-")]
    role_of = {parent_id: role for role, parent_id in reversed(entry.roles.items())}
    facts += [(f"{role_of.get(p.id, 'parent')} ({p.stage})", f"`{p.id}` at `{p.path}`") for p in parents]
    lines += ["| | |", "| --- | --- |", *[f"| {k} | {_cell(v)} |" for k, v in facts], ""]
    settings = [(k, v) for k, v in sorted(section.items()) if _is_scalar(v) and k != "mode"]
    if settings:
        lines += ["## Settings", "", "| field | value |", "| --- | --- |",
                  *[f"| `{k}` | {_cell(v)} |" for k, v in settings], "",
                  f"The full resolved config is in the registry entry: `rlhf registry show {entry.id}`.", ""]
    shown = [(k, v) for k, v in sorted(metrics.items()) if _is_scalar(v)]
    if shown:
        lines += ["## Final metrics", "", "| metric | value |", "| --- | --- |",
                  *[f"| `{k}` | {_cell(v)} |" for k, v in shown], ""]
    load = _LOAD.get(entry.stage)
    if load:
        lines += ["## How to load", "", "```python", f'FOLDER = "{entry.path}"', load, "```", ""]
        if (Path(entry.path) / "adapter").is_dir():
            lines += ["Trained with LoRA: the folder holds the merged weights, and `adapter/` the adapter alone "
                      "(`peft.PeftModel.from_pretrained(base_model, FOLDER + \"/adapter\")`).", ""]
    return "\n".join(lines)


def write(entry: Entry, *, parents: list[Entry], metrics: dict) -> Path:
    path = Path(entry.path) / FILE
    path.write_text(render(entry, parents=parents, metrics=metrics), encoding="utf-8")
    return path


def _data(section: dict) -> str:
    found = [section.get(k) for k in ("dataset", "eval_dataset", "eval_prompts", "prompts") if section.get(k)]
    paths = [d.get("path", str(d)) if isinstance(d, dict) else str(d) for d in found]
    return ", ".join(f"`{p}`" for p in paths) or "-"


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")
