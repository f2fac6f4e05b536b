"""MLorc with Hugging Face: transformers.Trainer, its checkpoints, finetune_param_groups on real
LLaMA models, and the fused backward pass in a training loop.

The model is a tiny random LlamaForCausalLM built from a LlamaConfig (nothing is downloaded), trained
on byte-level tokens of source files of the Python standard library. Trainer runs on CPU with
default TrainingArguments apart from the run length, batch size, saving and logging. Resumed runs
are compared bitwise: the sketch seeds are derived from (seed, parameter index, step), all in
state_dict, and Trainer restores its own RNG state and data order, so nothing needs a tolerance.
The whole module is skipped when transformers is not installed.
"""

import os
import shutil
import sysconfig
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")                 # build from configs; never reach a hub
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")                             # Trainer needs it
from hypothesis import given, strategies as st  # noqa: E402
from transformers import (LlamaConfig, LlamaForCausalLM, PrinterCallback, ProgressCallback,  # noqa: E402
                          Trainer, TrainingArguments, get_linear_schedule_with_warmup)

import mlorc  # noqa: E402

SEQ = 32
VARIANTS = {                                                  # lrs that move a tiny LLaMA within 30 steps
    "AdamW": (mlorc.MLorc_AdamW, dict(lr=3e-3)),
    "Lion": (mlorc.MLorc_Lion, dict(lr=3e-3)),
    "Prodigy": (mlorc.MLorc_Prodigy, dict(lr=1.0, d0=1e-4, slice_p=3)),
    "DAdapt_Lion": (mlorc.MLorc_DAdapt_Lion, dict(lr=1.0, d0=1e-4, slice_p=3)),
    "Adopt": (mlorc.MLorc_Adopt, dict(lr=3e-3)),
    "CAME": (mlorc.MLorc_CAME, dict(lr=3e-3)),
}
LOW_RANK = dict(rank=2, oversampling=1)                       # the sketched path: 32 x 32 and 64 x 32 weights


@pytest.fixture(autouse=True, scope="module")
def quiet_single_thread():
    """One intra-op thread (tiny tensors; a shared 2-core machine) and no transformers log output."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


def make_model(tie=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                         tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


class ByteChunks(torch.utils.data.Dataset):
    """Fixed-length byte-level chunks of a few standard-library source files (labels = inputs;
    the model shifts them)."""

    def __init__(self, n_chunks):
        lib = sysconfig.get_paths()["stdlib"]
        data = b"".join(open(os.path.join(lib, *name.split("/")), "rb").read()
                        for name in ("json/decoder.py", "json/encoder.py", "textwrap.py"))
        tokens = torch.frombuffer(bytearray(data[:n_chunks * SEQ]), dtype=torch.uint8).long()
        self.chunks = tokens.view(n_chunks, SEQ)

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


@pytest.fixture(scope="module")
def dataset():
    return ByteChunks(32)                 # 8 steps per epoch at batch 4: the runs below cross an epoch


def make_opt(name, model, **options):
    cls, defaults = VARIANTS[name]
    return cls(mlorc.finetune_param_groups(model, weight_decay=0.01, rank=LOW_RANK["rank"]),
               **{**defaults, "oversampling": LOW_RANK["oversampling"], **options})


def make_trainer(model, dataset, out, steps, optimizers=(None, None), save_steps=None,
                 optimizer_cls_and_kwargs=None, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, use_cpu=True,
                  report_to=[], seed=0, logging_steps=1, disable_tqdm=True,
                  save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    kwargs.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=dataset,
                      optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)
    trainer.remove_callback(PrinterCallback)      # the tests print nothing
    trainer.remove_callback(ProgressCallback)
    return trainer


def train_run(name, dataset, out, steps=12, save_steps=None, resume=None, fused=False, **options):
    """A Trainer run with an MLorc optimizer and a linear warmup/decay schedule passed in through
    `optimizers`; returns (model, optimizer, trainer)."""
    model = make_model()
    opt = make_opt(name, model, **options)
    if fused:
        mlorc.attach_fused_backward(model, opt)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=steps)
    extra = dict(max_grad_norm=0.0) if fused else {}           # no global clipping in the fused mode
    trainer = make_trainer(model, dataset, out, steps, (opt, sched), save_steps, **extra)
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, trainer


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_params_equal(model_a, model_b):
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), name


def assert_state_equal(opt_a, opt_b):
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for index, entries in sd_a["state"].items():
        assert entries.keys() == sd_b["state"][index].keys()
        for key, value in entries.items():
            other = sd_b["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)


# ----------------------------------------------------------------------------------------------------
# Trainer: MLorc trains a LLaMA, through `optimizers` or `optimizer_cls_and_kwargs`

@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_trainer_with_optimizer_and_scheduler_trains(name, dataset, tmp_path):
    steps = 30
    model, opt, trainer = train_run(name, dataset, tmp_path, steps=steps)
    curve = losses(trainer)
    assert len(curve) == steps
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5        # from ~ln(256) = 5.5 nats per byte
    assert all(group["lr"] == 0.0 for group in opt.param_groups)  # the linear schedule reached its end
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt   # accelerate wraps it
    weight = model.model.layers[0].self_attn.q_proj.weight
    state = opt.state[weight]
    assert state["step"] == steps and "exp_avg" not in state and state["exp_avg_U"].shape == (32, 2)


def test_trainer_optimizer_cls_and_kwargs_uses_our_groups(dataset, tmp_path):
    """optimizer_cls_and_kwargs with params=finetune_param_groups(...): Trainer builds the optimizer
    from our groups (its kwargs' "params" replaces Trainer's own grouping) and its own scheduler."""
    steps = 30
    model = make_model()
    groups = mlorc.finetune_param_groups(model, weight_decay=0.01, rank=2, dense_embeddings=True)
    trainer = make_trainer(model, dataset, tmp_path, steps, lr_scheduler_type="cosine", warmup_steps=3,
                           optimizer_cls_and_kwargs=(mlorc.MLorc_AdamW, dict(params=groups, lr=3e-3)))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)     # accelerate wraps it
    assert isinstance(opt, mlorc.MLorc_AdamW)
    assert [(g["rank"], g["weight_decay"]) for g in opt.param_groups] == [(2, 0.01), (2, 0.0), (None, 0.0)]
    assert all(abs(g["lr"]) < 1e-12 for g in opt.param_groups)  # cosine to 0 by Trainer's scheduler
    curve = losses(trainer)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    embedding = opt.state[model.model.embed_tokens.weight]
    assert "exp_avg" in embedding and embedding["exp_avg"].shape == (256, 32)   # dense_embeddings


# ----------------------------------------------------------------------------------------------------
# Trainer checkpoints: save_steps, then resume_from_checkpoint, equals the uninterrupted run

@pytest.mark.parametrize("name, fused",
                         [(name, False) for name in VARIANTS] + [("AdamW", True), ("Prodigy", True)],
                         ids=list(VARIANTS) + ["AdamW-fused", "Prodigy-fused"])
def test_trainer_resume_is_bitwise(name, fused, dataset, tmp_path):
    """12 steps saving at step 6 (and crossing an epoch at step 8), against a fresh Trainer resumed
    from checkpoint-6. The resumed optimizer is built with another sketch seed: the checkpoint's wins."""
    full_model, full_opt, _ = train_run(name, dataset, tmp_path / "full", save_steps=6, fused=fused)
    plain_model, _, _ = train_run(name, dataset, tmp_path / "plain", fused=fused)
    assert_params_equal(full_model, plain_model)               # saving a checkpoint changes nothing
    checkpoint = tmp_path / "full" / "checkpoint-6"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)   # Trainer's own loader does this
    matrices = [i for i, p in enumerate(p for g in full_opt.param_groups for p in g["params"]) if p.ndim == 2]
    # Prodigy and D-Adapt Lion freeze a group whose lr is 0, as it is at the warmup's first step
    expected_step = 5 if name in ("Prodigy", "DAdapt_Lion") else 6
    for i in matrices:
        assert "exp_avg" not in saved["state"][i] and saved["state"][i]["exp_avg_U"].ndim == 2
        assert saved["state"][i]["step"] == expected_step
    resumed_model, resumed_opt, _ = train_run(name, dataset, tmp_path / "resumed", resume=str(checkpoint),
                                              fused=fused, seed=12345)
    assert all(group["seed"] == 0 for group in resumed_opt.param_groups)
    assert_params_equal(full_model, resumed_model)
    assert_state_equal(full_opt, resumed_opt)


def test_resume_without_optimizer_state_differs(dataset, tmp_path):
    """The control of the test above: Trainer resumes silently with a fresh optimizer when the
    checkpoint has no optimizer.pt, and then the run is not the uninterrupted one."""
    full_model, _, _ = train_run("AdamW", dataset, tmp_path / "full", save_steps=6)
    checkpoint = tmp_path / "stripped"
    shutil.copytree(tmp_path / "full" / "checkpoint-6", checkpoint)
    os.remove(checkpoint / "optimizer.pt")
    resumed_model, resumed_opt, _ = train_run("AdamW", dataset, tmp_path / "resumed", resume=str(checkpoint))
    assert resumed_opt.state[resumed_model.lm_head.weight]["step"] == 6
    assert not torch.equal(full_model.lm_head.weight, resumed_model.lm_head.weight)


# ----------------------------------------------------------------------------------------------------
# finetune_param_groups on LLaMA models: a partition of the trainable parameters

def check_groups(model, groups, weight_decay, rank, dense_embeddings):
    trainable = [p for p in model.parameters() if p.requires_grad]          # a tied weight once
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})  # each in exactly one group
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    assert all(group["params"] for group in groups)                         # no empty group
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for group in groups:
        for p in group["params"]:
            if dense_embeddings and id(p) in embeddings:
                assert group["rank"] is None and group["weight_decay"] == 0.0
            elif p.ndim < 2:
                assert group["rank"] == rank and group["weight_decay"] == 0.0
            else:
                assert group["rank"] == rank and group["weight_decay"] == weight_decay


@given(tie=st.booleans(), dense=st.booleans(), frozen=st.lists(st.booleans(), min_size=21, max_size=21))
def test_finetune_param_groups_partition(tie, dense, frozen):
    """Any subset of frozen parameters, tied or untied embeddings, dense embeddings or not: every
    trainable parameter lands in exactly one group, with the decay and rank of its kind, and the
    groups make a working optimizer."""
    model = make_model(tie=tie)
    params = list(model.parameters())                      # 21 untied, 20 tied
    for p, freeze in zip(params, frozen):
        p.requires_grad_(not freeze)
    groups = mlorc.finetune_param_groups(model, weight_decay=0.1, rank=3, dense_embeddings=dense)
    check_groups(model, groups, 0.1, 3, dense)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if any(p.requires_grad for p in params):
        opt = mlorc.MLorc_AdamW(groups, lr=1e-3)               # raises on a parameter in two groups
        tokens = torch.arange(16).view(2, 8)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        assert set(opt.state) == {p for p in params if p.requires_grad}


def test_finetune_param_groups_tied_dense_embeddings_counted_once():
    model = make_model(tie=True)
    groups = mlorc.finetune_param_groups(model, weight_decay=0.01, rank=4, dense_embeddings=True)
    dense = [g for g in groups if g["rank"] is None]
    assert len(dense) == 1 and dense[0]["params"] == [model.model.embed_tokens.weight]
    model.model.embed_tokens.weight.requires_grad_(False)   # frozen embeddings: no dense group at all
    groups = mlorc.finetune_param_groups(model, weight_decay=0.01, rank=4, dense_embeddings=True)
    assert all(g["rank"] == 4 for g in groups)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_finetune_param_groups_lora_adapters_only():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    groups = mlorc.finetune_param_groups(model, weight_decay=0.01, rank=2, dense_embeddings=True)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert len(grouped) == 2 * 2 * 2 and all("lora_" in n for n in grouped)   # A, B x q, v x 2 layers


# ----------------------------------------------------------------------------------------------------
# The fused backward pass in a training loop: what it equals, and what it cannot do

def manual_loop(name, fused, steps=6, checkpointing=False, **options):
    """The example's loop: loss.backward(), then opt.step() (with the fused hooks it finds no
    gradient and only finishes the step), then the scheduler."""
    model = make_model()
    if checkpointing:                                       # the 5.x name, or the older one
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    opt = make_opt(name, model, **options)
    if fused:
        mlorc.attach_fused_backward(model, opt)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=steps)
    data = ByteChunks(4 * steps).chunks.view(steps, 4, SEQ)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)          # e.g. the scheduler's "step() not called"
        warnings.filterwarnings("ignore", category=FutureWarning)
        for tokens in data:
            model(input_ids=tokens, labels=tokens).loss.backward()
            if fused:
                assert all(p.grad is None for p in model.parameters())
            opt.step()
            opt.zero_grad()
            sched.step()
    return model, opt


@pytest.mark.parametrize("name, options, checkpointing", [
    ("AdamW", {}, False),
    ("AdamW", {}, True),
    ("Lion", dict(clip_threshold=0.05), False),
    ("Prodigy", {}, False),
], ids=["AdamW", "AdamW-checkpointing", "Lion-clip", "Prodigy"])
def test_fused_loop_equals_step_loop(name, options, checkpointing):
    """On a real LLaMA, with a scheduler and with activation checkpointing too, the fused loop equals
    the step() loop bitwise; MLorc_Lion's per-parameter clip_threshold works in both modes, and
    Prodigy's d estimate is finished by the opt.step() call that finds no gradients."""
    step_model, step_opt = manual_loop(name, False, checkpointing=checkpointing, **options)
    fused_model, fused_opt = manual_loop(name, True, checkpointing=checkpointing, **options)
    assert_params_equal(step_model, fused_model)
    assert_state_equal(step_opt, fused_opt)
    if "clip_threshold" in options:                       # and the clipping is active at this threshold
        unclipped, _ = manual_loop(name, True)
        assert not torch.equal(unclipped.lm_head.weight, fused_model.lm_head.weight)


def test_fused_without_accumulation_steps_steps_every_backward():
    """Without accumulation_steps, two backward calls before one opt.step() are two optimizer steps
    in the fused mode (and a different result from one step on the accumulated gradient)."""
    results = {}
    for fused in (False, True):
        model = make_model()
        opt = make_opt("AdamW", model)
        if fused:
            mlorc.attach_fused_backward(model, opt)
        tokens = ByteChunks(8).chunks.view(2, 4, SEQ)
        for micro_batch in tokens:                         # accumulate two micro-batches, then step
            (model(input_ids=micro_batch, labels=micro_batch).loss / 2).backward()
        opt.step()
        results[fused] = (model, opt.state[model.lm_head.weight]["step"])
    assert results[False][1] == 1 and results[True][1] == 2
    assert not torch.equal(results[False][0].lm_head.weight, results[True][0].lm_head.weight)


def test_fused_in_trainer(dataset, tmp_path):
    """Trainer with the fused hooks equals Trainer without them when max_grad_norm=0. Trainer's global
    clipping (max_grad_norm, default 1.0) is inert in the fused mode: it finds no gradients (they were
    applied and freed during backward), so the fused run ignores it, and says so once."""
    def run(fused, max_grad_norm, out):
        model = make_model()
        opt = make_opt("AdamW", model)
        if fused:
            mlorc.attach_fused_backward(model, opt)
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
        make_trainer(model, dataset, out, 8, (opt, sched), max_grad_norm=max_grad_norm).train()
        return model

    plain_unclipped = run(False, 0.0, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_params_equal(plain_unclipped, run(True, 0.0, tmp_path / "b"))
    assert not any("max_grad_norm" in str(w.message) for w in caught)          # no warning at 0
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 does nothing") as caught:
        assert_params_equal(plain_unclipped, run(True, 1.0, tmp_path / "c"))  # clipping did nothing
    assert sum("max_grad_norm" in str(w.message) for w in caught) == 1         # once, not every step
    plain_clipped = run(False, 0.1, tmp_path / "d")
    assert not torch.equal(plain_clipped.lm_head.weight, plain_unclipped.lm_head.weight)


def test_fused_in_trainer_with_accumulation_equals_trainer_without_hooks(dataset, tmp_path):
    """gradient_accumulation_steps=2 with attach_fused_backward(..., accumulation_steps=2): each
    parameter is stepped at its second micro-batch's gradient, so the run equals Trainer's own
    accumulation without the hooks (4 Trainer steps are 4 optimizer steps)."""
    def run(fused, out):
        model = make_model()
        opt = make_opt("AdamW", model)
        if fused:
            mlorc.attach_fused_backward(model, opt, accumulation_steps=2)
        make_trainer(model, dataset, out, 4, (opt, None), max_grad_norm=0.0,
                     gradient_accumulation_steps=2).train()
        return model, opt

    (plain, plain_opt), (fused, fused_opt) = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    assert_params_equal(plain, fused)
    assert_state_equal(plain_opt, fused_opt)
    assert fused_opt.state[fused.lm_head.weight]["step"] == 4


def test_fused_in_trainer_steps_every_micro_batch(dataset, tmp_path):
    """gradient_accumulation_steps=2 with the fused hooks but no accumulation_steps: each
    micro-batch's backward is a step, so 4 Trainer steps are 8 optimizer steps."""
    model = make_model()
    opt = make_opt("AdamW", model)
    mlorc.attach_fused_backward(model, opt)
    make_trainer(model, dataset, tmp_path, 4, (opt, None), max_grad_norm=0.0,
                 gradient_accumulation_steps=2).train()
    assert opt.state[model.lm_head.weight]["step"] == 8
