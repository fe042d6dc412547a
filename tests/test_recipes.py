"""The small-data recipes: layer-wise lr decay (the groups and their rates, under both schedules), re-drawing the
top layers (exactly those, from the encoder's initialiser, seeded), Adam without bias correction, and the three
flags through the command line."""
import json
import re
from types import SimpleNamespace

import pytest
import torch
from tiny import make_tiny_encoder, sst2_rows, tiny_encoder, write_tsv
from torch import nn
from transformers import AutoConfig, AutoModel

from fastcls.cli import main
from fastcls.components.lr_schedule import DeviceLRSchedule, ScheduleConfig, build_scheduler, lr_factor
from fastcls.components.optimizer import OptimizerConfig, build_optimizer, param_groups
from fastcls.config import TrainConfig, load_config_file
from fastcls.errors import ConfigError
from fastcls.models.classifier import EncoderClassifier, Tasks
from fastcls.models.encoder import LayerwiseEncoder
from fastcls.models.loading import load_encoder
from fastcls.models.reinit import reinit_top_layers
from fastcls.optim import FusedAdamW

LR, XI = 1e-3, 0.5
TASK_LAYERS = 1  # with --task-layers, each task's own copy of the top layer


def _tiny(family: str, layers: int = 3, **extra) -> nn.Module:
    if family in ("bert", "distilbert"):
        return tiny_encoder(family, layers=layers)
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=99, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                  pad_token_id=1, **extra)
    return AutoModel.from_config(config)


# (family, extra config, where its layers are, the depth-from-top of parameters in neither layers nor embeddings)
ENCODERS = {
    "bert": ("bert", {}, r"encoder\.encoder\.layer\.(\d+)\.", {}),
    "distilbert": ("distilbert", {}, r"encoder\.transformer\.layer\.(\d+)\.", {}),
    # ELECTRA's embeddings_project lies below the first layer: the embeddings' rate
    "electra": ("electra", {"embedding_size": 16}, r"encoder\.encoder\.layer\.(\d+)\.",
                {r"encoder\.embeddings_project\.": "embeddings"}),
    # own forward: MPNet's relative attention bias, read by every layer, takes the top layer's rate
    "mpnet": ("mpnet", {}, r"encoder\.encoder\.layer\.(\d+)\.", {r"encoder\.encoder\.relative_attention_bias\.": 1}),
    # own forward: ModernBERT's final norm above the layers takes the top layer's rate
    "modernbert": ("modernbert", {}, r"encoder\.layers\.(\d+)\.", {r"encoder\.final_norm\.": 1}),
}


def _expected_depth(name: str, layer_pattern: str, others: dict, layers: int) -> int:
    """The depth from the top that the recipe gives parameter `name`, read from its name alone."""
    if name.startswith("head."):
        return 0
    match = re.match(layer_pattern, name)
    if match:
        return layers - int(match.group(1))
    task = re.match(r"task_layers\.copies\.\d+\.(\d+)\.", name)
    if task:  # the task layers stand above the shared ones: with K of them, copy k's depth is K - k
        return TASK_LAYERS - int(task.group(1))
    for pattern, depth in others.items():
        if re.match(pattern, name):
            return layers + 1 if depth == "embeddings" else depth
    assert name.startswith("encoder.embeddings."), name
    return layers + 1



def _decayed(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and not re.search(r"norm", name, re.IGNORECASE)


def _check_groups(model: nn.Module, groups: list[dict], layer_pattern: str, others: dict, layers: int) -> None:
    """Every trainable parameter in exactly one group, at lr x XI ** depth, decayed unless a bias or norm weight;
    one group per (depth, decay), none empty, the head's first."""
    group_of = {id(p): group for group in groups for p in group["params"]}
    assert len(group_of) == sum(len(group["params"]) for group in groups)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable)
    keys = set()
    for name, p in trainable:
        group, depth = group_of[id(p)], _expected_depth(name, layer_pattern, others, layers)
        assert group["lr"] == LR * XI ** depth, name
        assert group["weight_decay"] == (0.01 if _decayed(name, p) else 0.0), name
        keys.add((depth, _decayed(name, p)))
    assert len(groups) == len(keys) and all(group["params"] for group in groups)
    assert groups[0]["lr"] == LR


@pytest.mark.parametrize("case", ENCODERS)
def test_layer_lr_decay_gives_each_parameter_lr_times_xi_to_its_depth(case):
    family, extra, layer_pattern, others = ENCODERS[case]
    encoder = _tiny(family, **extra)
    assert LayerwiseEncoder.supports(encoder) == (family not in ("mpnet", "modernbert"))
    model = EncoderClassifier(encoder, 3, 0.1)
    groups = param_groups(model, 0.01, LR, XI)
    _check_groups(model, groups, layer_pattern, others, 3)
    assert len(groups) >= 2 * 5 - 1  # head, 3 layers and the embeddings, most with both kinds


class PlainEncoder(nn.Module):
    """An encoder of the user's own: no family, no named embeddings module."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=3, hidden_size=8)
        self.tokens = nn.Embedding(99, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.final_norm = nn.LayerNorm(8)

    def forward(self, input_ids, attention_mask):
        h = self.tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.final_norm(h)


def test_layer_lr_decay_of_an_encoder_of_ones_own_follows_its_registration_order():
    model = EncoderClassifier(PlainEncoder(), 3, 0.1)
    groups = param_groups(model, 0.01, LR, XI)
    _check_groups(model, groups, r"encoder\.layers\.(\d+)\.", {r"encoder\.tokens\.": "embeddings",
                                                              r"encoder\.final_norm\.": 1}, 3)


def test_layer_lr_decay_with_task_layers_and_frozen_layers():
    model = EncoderClassifier(tiny_encoder("bert", layers=3), None, 0.1,
                              tasks=Tasks(["a", "b"], [2, 3], task_layers=TASK_LAYERS, uncertainty=True))
    model.freeze(True, 1)
    groups = param_groups(model, 0.01, LR, XI)
    log_variances = groups.pop()  # the learned loss weights keep their own 100x group
    assert log_variances["lr"] == 100 * LR and log_variances["params"] == [model.head.log_variance]
    model.head.log_variance.requires_grad_(False)  # out of the check below, which reads depths from names
    _check_groups(model, groups, r"encoder\.encoder\.layer\.(\d+)\.", {}, 3)
    frozen = {id(p) for p in [*model.encoder.embeddings.parameters(), *model.encoder.encoder.layer[0].parameters()]}
    assert not frozen & {id(p) for group in groups for p in group["params"]}
    # the shared layer 1 at depth 2, both tasks' copies of the top layer at depth 1
    assert {p.data_ptr() for p in model.task_layers.copies[1][0].parameters()} <= {
        p.data_ptr() for group in groups if group["lr"] == LR * XI for p in group["params"]}


def test_xi_one_keeps_todays_two_groups():
    model = EncoderClassifier(tiny_encoder("bert"), 3, 0.1)
    groups = param_groups(model, 0.01, LR, 1.0)
    names = {id(p): name for name, p in model.named_parameters()}
    assert [set(group) for group in groups] == [{"params", "weight_decay"}] * 2  # the optimizer's lr, as before
    assert [names[id(p)] for p in groups[0]["params"]] == [n for n, p in model.named_parameters() if _decayed(n, p)]
    assert [names[id(p)] for p in groups[1]["params"]] == [n for n, p in model.named_parameters()
                                                          if not _decayed(n, p)]


@pytest.mark.parametrize("device_schedule", [False, True], ids=["LambdaLR", "DeviceLRSchedule"])
def test_the_schedule_scales_each_groups_own_base_rate(device_schedule):
    model = EncoderClassifier(tiny_encoder("bert"), 3, 0.1)
    groups = param_groups(model, 0.01, LR, XI)
    bases = [group["lr"] for group in groups]
    optimizer = build_optimizer(groups, OptimizerConfig(lr=LR))
    cfg = ScheduleConfig(total_steps=7, warmup_steps=2, decay="cosine")
    scheduler = DeviceLRSchedule(optimizer, cfg) if device_schedule else build_scheduler(optimizer, cfg)
    assert len(set(bases)) == 5
    for step in range(7):
        rates = [float(group["lr"]) for group in optimizer.param_groups]
        assert rates == pytest.approx([base * lr_factor(step, cfg) for base in bases], rel=1e-6, abs=0), step
        optimizer.step()  # no gradients: nothing moves
        scheduler.step()


def _perturbed(encoder: nn.Module) -> dict:
    """Every weight moved off its initial value (biases off 0, norm weights off 1); returns a copy of them."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))
    return {name: t.clone() for name, t in encoder.state_dict().items()}


def test_reinit_redraws_exactly_the_top_layers_from_the_encoders_initialiser(tmp_path):
    # loaded weights are marked initialised (transformers 5), which its init functions would skip
    encoder = load_encoder(make_tiny_encoder(tmp_path / "enc", num_hidden_layers=3))
    assert all(getattr(p, "_is_hf_initialized", True) for p in encoder.parameters())
    before = _perturbed(encoder)
    encoder.config.initializer_range = 0.2  # far from the loaded weights' spread
    rng = torch.get_rng_state()
    reinit_top_layers(encoder, 2, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's own draws are untouched
    after = encoder.state_dict()
    for name, tensor in after.items():
        top = re.match(r"encoder\.layer\.([12])\.", name)
        if not top:
            assert torch.equal(tensor, before[name]), name
        elif "LayerNorm.weight" in name:
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith("bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        else:
            assert abs(tensor.mean().item()) < 0.03 and tensor.std().item() == pytest.approx(0.2, rel=0.1), name
    again = load_encoder(tmp_path / "enc")
    _perturbed(again)
    again.config.initializer_range = 0.2
    reinit_top_layers(again, 2, seed=5)
    assert all(torch.equal(t, after[name]) for name, t in again.state_dict().items())  # same seed, same weights
    other = load_encoder(tmp_path / "enc")
    reinit_top_layers(other, 2, seed=6)
    w = "encoder.layer.2.attention.self.query.weight"
    assert not torch.equal(other.state_dict()[w], after[w])


def test_reinit_of_a_distilbert_and_its_errors():
    encoder = tiny_encoder("distilbert", layers=3)
    before = _perturbed(encoder)
    reinit_top_layers(encoder, 1, seed=0)
    changed = {name for name, t in encoder.state_dict().items() if not torch.equal(t, before[name])}
    assert changed == {name for name in before if name.startswith("transformer.layer.2.")}
    with pytest.raises(ConfigError, match="--reinit-layers 4: .* has 3 layers"):
        reinit_top_layers(encoder, 4, seed=0)
    with pytest.raises(ConfigError, match="--reinit-layers 2 with --freeze-layers 2"):
        reinit_top_layers(encoder, 2, seed=0, frozen_layers=2)
    plain = nn.Module()
    plain.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ConfigError, match="--reinit-layers: Module has no initialiser"):
        reinit_top_layers(plain, 1, seed=0)
    reinit_top_layers(plain, 0, seed=0)  # off: nothing asked of the encoder


def test_adam_without_bias_correction_follows_the_formula():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(13))]
    w = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    optimizer = build_optimizer([{"params": params, "weight_decay": wd}],
                                OptimizerConfig(lr=lr, betas=(b1, b2), eps=eps, bias_correction=False))
    assert isinstance(optimizer, FusedAdamW)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        for i, g in enumerate(grads):  # no 1 / (1 - beta ** t) on either moment
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            w[i] = w[i] * (1 - lr * wd) - lr * m[i] / (v[i].sqrt() + eps)
    for p, ref in zip(params, w):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_bias_correction_off_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="--bias-correction off is not available with --fsdp"):
        TrainConfig(fsdp=True, bias_correction=False).resolve()
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="--bias-correction off applies to fastcls's FusedAdamW"):
        build_optimizer(param_groups(model, 0.0), OptimizerConfig(bias_correction=False),
                        factory=lambda groups: torch.optim.SGD(groups, lr=0.1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    return tmp, make_tiny_encoder(tmp / "enc"), write_tsv(tmp / "train.tsv", sst2_rows(16))


def test_the_three_flags_through_the_command_line(tiny_run, capsys):
    tmp, encoder, train = tiny_run
    code = main(["train", "--model", str(encoder), "--train", str(train), "--output", str(tmp / "run"),
                 "--max-steps", "2", "--batch-size", "8", "--layer-lr-decay", "0.8", "--reinit-layers", "1",
                 "--bias-correction", "off"])
    assert code == 0
    assert "layer-wise lr decay 0.8 (lowest at lr x 0.51)" in capsys.readouterr().out  # 0.8 ** 3, 2 layers
    saved = json.loads((tmp / "run" / "train_config.json").read_text())
    assert (saved["layer_lr_decay"], saved["reinit_layers"], saved["bias_correction"]) == (0.8, 1, False)
    config = tmp / "recipes.toml"
    config.write_text("layer-lr-decay = 0.9\nreinit_layers = 1\nbias_correction = false\n")
    assert load_config_file(config) == {"layer_lr_decay": 0.9, "reinit_layers": 1, "bias_correction": False}


@pytest.mark.parametrize("flags, named", [
    (["--layer-lr-decay", "0"], "--layer-lr-decay"),
    (["--layer-lr-decay", "1.5"], "--layer-lr-decay"),
    (["--layer-lr-decay", "nan"], "--layer-lr-decay"),
    (["--reinit-layers", "-1"], "--reinit-layers"),
    (["--reinit-layers", "3"], "--reinit-layers 3"),
    (["--reinit-layers", "2", "--freeze-layers", "1"], "--reinit-layers 2 with --freeze-layers 1"),
    (["--bias-correction", "maybe"], "--bias-correction"),
    (["--bias-correction", "off", "--fsdp"], "--fsdp"),
])
def test_bad_recipe_values_give_one_line_and_exit_2(tiny_run, capsys, flags, named):
    tmp, encoder, train = tiny_run
    code = main(["train", "--model", str(encoder), "--train", str(train), "--output", str(tmp / "bad"),
                 "--max-steps", "1", *flags])
    # transformers' own progress bar of the weights' loading (before the checks that need the model) aside
    lines = [line for line in capsys.readouterr().err.splitlines() if line and "Loading weights" not in line]
    assert code == 2 and len(lines) == 1 and named in lines[0], lines
    assert not (tmp / "bad").exists()
