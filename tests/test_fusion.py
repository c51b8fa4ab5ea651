"""Sibling Linear layers (same input) fused into one product in exported programs."""

import torch

from test_decoding import tiny_llama


def linear_calls(graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default)


class Siblings(torch.nn.Module):
    """q/k/v-like layers with biases, a bias-free pair, and a weight tied to a layer
    that reads another input: only layers alike in all but their width are fused."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(16, n) for n in (16, 8, 8))
        self.gate, self.up = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
        self.other = torch.nn.Linear(32, 32, bias=False)
        self.tied = torch.nn.Linear(16, 32, bias=False)
        self.tied.weight = self.gate.weight  # read by gate (fused) and by tied (another input)

    def forward(self, x):
        h = torch.cat([self.q(x), self.k(x), self.v(x)], -1)
        m = torch.nn.functional.silu(self.gate(x)) * self.up(x)
        return h.sum(-1, keepdim=True) + self.other(m) + self.tied(x * 2)


def test_sibling_linears_become_one_product_with_the_same_outputs(tmp_path):
    from modelkiln.targets.fusion import fused_program
    from modelkiln.plugins.api import InputSpec
    from modelkiln.targets.shapes import dynamic_shapes

    model = Siblings().eval()
    args = (torch.randn(3, 16),)
    inputs = [InputSpec(f"x{i}", (-1, *a.shape[1:]), "float32") for i, a in enumerate(args)]
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes(model, inputs))
    fused, fused_away = fused_program(program, args, {}, lambda m: dynamic_shapes(m, inputs))
    assert fused_away == 3  # q, k, v -> 1 (biases concatenated); gate, up -> 1; tied reads x * 2
    assert linear_calls(program.graph) == 7 and linear_calls(fused.graph) == 4
    torch.export.save(fused, str(tmp_path / "model.pt2"))
    loaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    for batch in (1, 5):  # the batch dimension stays dynamic
        x = torch.randn(batch, 16)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    # The tied weight is still there for the layer that reads another input; the
    # separate q/k/v and up weights are gone (the artifact holds each weight once).
    names = set(fused.state_dict) | set(fused.constants)
    assert any(name.endswith("gate.weight") or name.endswith("tied.weight") for name in names)
    assert not any(name.endswith(("q.weight", "k.weight", "v.weight", "up.weight")) for name in names), names


def test_a_program_without_siblings_is_left_as_it_is():
    from modelkiln.targets.fusion import fused_program

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    args = (torch.randn(2, 4),)
    program = torch.export.export(model, args)
    assert fused_program(program, args, {}, lambda m: None) == (program, 0)


def test_the_decoding_program_fuses_attention_and_mlp_projections_and_decodes_the_same():
    from modelkiln.targets.decoding import export_decoder

    model = tiny_llama()  # 2 blocks; grouped-query k/v projections narrower than q
    with torch.no_grad():
        plain, none = export_decoder(model, fuse=False)
        fused, fused_away = export_decoder(model)
    assert none == 0 and fused_away == 2 * 3  # per block q/k/v -> 1, gate/up -> 1
    assert linear_calls(fused.graph) == linear_calls(plain.graph) - 6
    runs = []
    for program in (plain.module(), fused.module()):
        with torch.no_grad():
            logits = program(input_ids=torch.arange(1, 9)[None], cache_position=torch.arange(8))
            tokens, steps = [], [logits]
            for position in range(8, 20):  # the static KV cache is written and read again
                token = logits[:, -1:].argmax(-1)
                tokens.append(int(token))
                logits = program(input_ids=token, cache_position=torch.tensor([position]))
                steps.append(logits)
        runs.append((tokens, steps))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
