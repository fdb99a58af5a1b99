"""The reward model's language-model regulariser (`rm.lm_loss_coef`): the next-token loss against a causal LM's
own, the trainer's loss against TRL's plus that term, the stage end to end, and the refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, TaskType, get_peft_model
from test_rm import small as rm_pipeline
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig
from trl import RewardConfig

from rlhf.errors import ConfigError
from rlhf.pipeline import history
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.registry import Registry
from rlhf.stages import rm
from rlhf.stages.rm_lm import LMRegularisedRewardTrainer, PreferenceWithResponseMask, lm_head_for
from rlhf.training.reward_lm import backbone, next_token_loss, output_embedding
from rlhf.training.tiny import build_tokenizer


def llama(*, tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0, num_labels=1)


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 3, 7 and 5 real tokens, right-padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (3, 7), generator=gen)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, length in enumerate((3, 7, 5)):
        mask[row, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("tied", [True, False])
def test_next_token_loss_is_the_causal_lms_own_loss(tied):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama(tied=tied)).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = next_token_loss(hidden, output_embedding(model), ids, mask)
    assert torch.allclose(ours, own, atol=1e-5), (ours, own)


def test_next_token_loss_reads_left_padding_and_is_zero_without_targets():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama(tied=True)).eval()
    weight = output_embedding(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    left = torch.tensor([[0, 0, 5, 6, 7, 8]])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = next_token_loss(model.model(input_ids=ids).last_hidden_state, weight, ids, torch.ones_like(ids))
        hidden = model.model(input_ids=left, attention_mask=left_mask).last_hidden_state
        padded = next_token_loss(hidden, weight, left, left_mask)
    assert torch.allclose(alone, padded, atol=1e-5)
    one = torch.tensor([[5, 0]])
    empty = next_token_loss(torch.randn(1, 2, 16, requires_grad=True), weight, one, torch.tensor([[1, 0]]))
    assert empty.item() == 0.0 and empty.requires_grad


def test_next_token_loss_predicts_only_the_targets_asked_for():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama(tied=False)).eval()
    ids, mask = padded_batch()
    response = mask.clone()
    response[:, :2] = 0  # the first two tokens of each row are its prompt
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(response == 0, -100)).loss
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = next_token_loss(hidden, output_embedding(model), ids, mask, target_mask=response)
        whole = next_token_loss(hidden, output_embedding(model), ids, mask)
    assert torch.allclose(ours, own, atol=1e-5) and not torch.allclose(ours, whole, atol=1e-3)


def test_collator_marks_the_chosen_responses_tokens():
    collate = PreferenceWithResponseMask(pad_token_id=0)
    batch = collate([{"chosen_ids": [4, 5, 6, 7], "rejected_ids": [4, 5, 9], "chosen_prompt_length": 2},
                     {"chosen_ids": [8, 9], "rejected_ids": [8, 3, 3, 3, 3], "chosen_prompt_length": 1}])
    assert batch["input_ids"].shape == (4, 5)
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]
    held_out = collate([{"chosen_ids": [4, 5], "rejected_ids": [4, 6]}])
    assert "response_mask" not in held_out and set(held_out) == {"input_ids", "attention_mask"}


def test_prompt_lengths_of_tokenised_pairs_count_the_prompts_tokens_left_after_cutting():
    tokenizer = build_tokenizer(["Describe the red fox.\nthe fox is kind. the fox is cruel."], vocab_size=300)
    row = {"prompt": "Describe the red fox.\n", "chosen": "the fox is kind.", "rejected": "the fox is cruel."}
    prompt = len(tokenizer(row["prompt"])["input_ids"])
    [whole], _ = rm.tokenize_pairs([row], tokenizer, max_length=64, prompt_lengths=True)
    assert whole["chosen_prompt_length"] == prompt
    assert whole["chosen_ids"][:prompt] == tokenizer(row["prompt"])["input_ids"]
    [cut], truncated = rm.tokenize_pairs([row], tokenizer, max_length=len(whole["chosen_ids"]) - 3, prompt_lengths=True)
    assert truncated == 1 and cut["chosen_prompt_length"] == prompt - 3
    [plain], _ = rm.tokenize_pairs([row], tokenizer, max_length=64)
    assert "chosen_prompt_length" not in plain


def test_backbone_of_plain_and_peft_wrapped_models():
    model = AutoModelForSequenceClassification.from_config(llama(tied=True))
    assert backbone(model) is model.model
    wrapped = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["q_proj"]))
    assert backbone(wrapped) is model.model


def small(tmp_path: Path, name: str) -> Path:
    return rm_pipeline(tmp_path, name=name, steps=60, lr=5e-3, save_steps=60)


def run(file: Path, overrides=()):
    pipeline, path = load_pipeline(file, ["rm.use_margin=false", *overrides])
    return rm.run(pipeline, registry=Registry(os.environ["RLHF_HOME"]), where=str(path))


def test_the_stage_trains_the_language_term_and_saves_an_ordinary_reward_model(tmp_path):
    entry = run(small(tmp_path, "regularised"), ["rm.lm_loss_coef=1.0"])
    assert entry.status == "complete" and entry.config["rm"]["lm_loss_coef"] == 1.0
    assert entry.metrics["eval/accuracy"] > entry.metrics["eval/init_accuracy"] + 0.1, entry.metrics
    # The same run with the term weighed next to nothing: its language loss, logged all the same, stays higher.
    light = run(small(tmp_path, "light"), ["rm.lm_loss_coef=1e-6"])

    def language_losses(found) -> list[float]:
        return [row["train/lm_loss"] for row in history.read(found.path) if "train/lm_loss" in row]

    trained, untrained = language_losses(entry), language_losses(light)
    assert len(trained) == len(untrained) >= 5
    assert trained[-1] < trained[0] - 0.1 and trained[-1] < untrained[-1] - 0.1, (trained, untrained)
    # The saved folder is an ordinary one-label reward model: no language-model head was added to it.
    model, info = AutoModelForSequenceClassification.from_pretrained(entry.path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.num_labels == 1


def test_the_trainers_loss_is_trls_plus_the_term_in_training_and_trls_alone_in_evaluation(tmp_path):
    torch.manual_seed(0)
    causal = AutoModelForCausalLM.from_config(llama(tied=False))
    model = AutoModelForSequenceClassification.from_config(llama(tied=False))
    model.model.load_state_dict(causal.model.state_dict())
    tokenizer = build_tokenizer(["a few words to learn from"], vocab_size=300)
    pairs = Dataset.from_list([{"chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]}])
    args = RewardConfig(output_dir=str(tmp_path), bf16=False, report_to=[], use_cpu=True, disable_dropout=True)
    trainer = LMRegularisedRewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                         lm_loss_coef=0.25, lm_head_weight=output_embedding(causal))
    (chosen, chosen_mask), (rejected, rejected_mask) = padded_batch(0), padded_batch(1)
    ids = torch.cat([chosen, rejected])  # chosen rows, then rejected rows, as TRL's collator lays them out
    mask = torch.cat([chosen_mask, rejected_mask])
    response = chosen_mask.clone()
    response[:, :2] = 0  # two prompt tokens in each chosen row: not predicted
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        pairwise = -torch.nn.functional.logsigmoid(scores[:3] - scores[3:]).mean()
        labels = chosen.masked_fill(response == 0, -100)
        language = causal(input_ids=chosen, attention_mask=chosen_mask, labels=labels).loss
        model.train()
        training = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "response_mask": response})
        model.eval()
        evaluating = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "response_mask": response})
    assert torch.allclose(training, pairwise + 0.25 * language, atol=1e-5), (training, pairwise, language)
    assert torch.allclose(evaluating, pairwise, atol=1e-6)
    assert trainer._metrics["train"]["lm_loss"] == [pytest.approx(language.item(), abs=1e-5)]


def test_a_start_without_a_language_model_head_gives_none_and_why(tmp_path):
    reward = AutoModelForSequenceClassification.from_config(llama(tied=False))
    reward.save_pretrained(tmp_path / "rm")  # its untied head was dropped: nothing to predict tokens with
    weight, why = lm_head_for(str(tmp_path / "rm"), reward, trust_remote_code=False, allow_pickle=False)
    assert weight is None and "has no language-model head" in why and "lm_head.weight" in why
    causal = AutoModelForCausalLM.from_config(llama(tied=False))
    causal.save_pretrained(tmp_path / "policy")
    grown = AutoModelForSequenceClassification.from_config(llama(tied=False))
    grown.resize_token_embeddings(64)  # a pad token added for the reward model: zero rows for it
    weight, why = lm_head_for(str(tmp_path / "policy"), grown, trust_remote_code=False, allow_pickle=False)
    assert weight.shape == (64, 16) and torch.equal(weight[:61], causal.lm_head.weight) and not weight[61:].any()
    assert why == ""


def test_a_tied_causal_start_gives_its_head_without_loading_it_again(tmp_path, monkeypatch):
    causal = AutoModelForCausalLM.from_config(llama(tied=True))
    causal.save_pretrained(tmp_path / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "policy", num_labels=1)
    reward.resize_token_embeddings(64)  # a pad token added for the reward model: zero rows for it
    monkeypatch.setattr("rlhf.stages.rm_lm.load_causal_lm", lambda *a, **k: pytest.fail("loaded a second time"))
    weight, why = lm_head_for(str(tmp_path / "policy"), reward, trust_remote_code=False, allow_pickle=False)
    assert why == "" and weight.shape == (64, 16) and weight.dtype == torch.float32
    assert torch.equal(weight[:61], causal.lm_head.weight) and not weight[61:].any()
    assert weight.data_ptr() != reward.get_input_embeddings().weight.data_ptr()  # a copy: training cannot move it


@pytest.mark.parametrize("shard", [None, "8KB"])
def test_an_untied_causal_start_gives_its_head_from_the_files_alone(tmp_path, monkeypatch, shard):
    causal = AutoModelForCausalLM.from_config(llama(tied=False))
    causal.save_pretrained(tmp_path / "policy", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "policy" / "model.safetensors.index.json").is_file() == bool(shard)
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "policy", num_labels=1)
    monkeypatch.setattr("rlhf.stages.rm_lm.load_causal_lm", lambda *a, **k: pytest.fail("loaded a second time"))
    weight, why = lm_head_for(str(tmp_path / "policy"), reward, trust_remote_code=False, allow_pickle=False)
    assert why == "" and weight.dtype == torch.float32 and torch.equal(weight, causal.lm_head.weight)


def test_an_encoder_start_trains_without_the_term_and_says_so(tmp_path, capsys):
    entry = run(small(tmp_path, "encoder"), ["rm.init=tiny-encoder", "rm.lm_loss_coef=0.3", "rm.max_steps=10"])
    assert entry.status == "complete"
    assert "rm: warning: rm.lm_loss_coef 0.3 is not applied: the tiny-encoder start has no next-token head" \
        in capsys.readouterr().out
    assert not [row for row in history.read(entry.path) if "train/lm_loss" in row]


def test_a_negative_weight_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'rm\.lm_loss_coef' must be at least 0"):
        load_pipeline(small(tmp_path, "bad"), ["rm.lm_loss_coef=-0.1"])
