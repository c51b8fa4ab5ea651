"""The all-reduces a tensor-parallel rank's program hands to the one-shot kernel.

Which all-reduces qualify is decided on the exported graph (CPU here); the kernel itself
needs GPUs that read each other's memory: ``test_gpu.py`` runs it on two.
"""

import torch

from modelkiln.targets.collectives import one_shot_available, one_shot_candidates


class RowParallel(torch.nn.Module):
    """A Linear's partial product summed over the ranks, as shard.tensor_parallel's is."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width, width), requires_grad=False)

    def forward(self, x):
        partial = torch.nn.functional.linear(x, self.weight)
        functional = torch.ops._c10d_functional
        return functional.wait_tensor(functional.all_reduce(partial, "sum", "0")) * 2


def exported(batch_bounded: bool, saved_to=None):
    positions = torch.export.Dim("positions", min=1, max=63)
    shapes = ({1: positions},) if batch_bounded else ({0: torch.export.Dim("batch"), 1: positions},)
    program = torch.export.export(RowParallel(), (torch.randn(2 if not batch_bounded else 1, 4, 8),),
                                  dynamic_shapes=shapes)
    if saved_to is not None:  # as a rank loads it: the bounds travel in the file
        torch.export.save(program, str(saved_to))
        program = torch.export.load(str(saved_to))
    return program.module()


def test_an_all_reduce_whose_message_is_bounded_and_small_is_chosen(tmp_path):
    module = exported(batch_bounded=True, saved_to=tmp_path / "rank0.pt2")
    chosen, largest, dtype = one_shot_candidates(module, "0", max_bytes=4096)
    # batch 1 x at most 63 positions x 8 float32 = 2016 bytes: the buffer's size
    assert len(chosen) == 1 and largest == 63 * 8 and dtype == torch.float32
    assert one_shot_candidates(module, "0", max_bytes=1024)[0] == []  # may exceed the limit
    assert one_shot_candidates(module, "1", max_bytes=4096)[0] == []  # another group's


def test_an_all_reduce_without_a_bound_on_its_message_stays_on_the_collective_library():
    assert one_shot_candidates(exported(batch_bounded=False), "0", max_bytes=1 << 30)[0] == []


def test_the_one_shot_path_is_not_offered_off_the_gpu():
    assert one_shot_available("cpu", 2) == "the ranks are not on GPUs"
