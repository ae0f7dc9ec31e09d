import pytest
import torch

from infinipipe.runtime.memory import SavedTensorMeter


def test_counts_saved_storage_and_releases_it_in_backward():
    x = torch.randn(100, 10, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = (x * 2).exp()  # exp saves its output: 100*10 fp32
    assert meter.current == 100 * 10 * 4
    y.sum().backward()
    assert meter.current == 0
    assert meter.peak == 100 * 10 * 4


def test_views_of_one_storage_are_counted_once():
    x = torch.randn(64, 64, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = x * 1.0
        z = y[:32].sin() + y[32:].sin() + y.t().sin().t()[:32]
    assert meter.current == 64 * 64 * 4
    z.sum().backward()
    assert meter.current == 0


def test_excluded_parameters_are_not_activations():
    lin = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    with SavedTensorMeter(exclude=lin.parameters()) as meter:
        out = lin(x)
    assert meter.current == x.numel() * 4
    del out


def test_peak_tracks_the_largest_held_amount():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorMeter() as meter:
        a = x.exp()
        b = a.exp()
    b.sum().backward()
    assert meter.peak == 2 * 1000 * 4 and meter.current == 0
    meter.reset_peak()
    assert meter.peak == 0


def test_tensors_saved_outside_the_context_are_not_counted():
    x = torch.randn(10, requires_grad=True)
    with SavedTensorMeter() as meter:
        pass
    y = x.exp()
    assert meter.current == 0
    y.sum().backward()


def test_held_tensors_count_once_per_storage_and_leave_on_release():
    x = torch.randn(256, requires_grad=True)
    kept = torch.randn(1000)
    meter = SavedTensorMeter()
    with meter:
        y = (x * x).sum()
    saved = meter.current
    meter.hold(x)  # already counted as a saved tensor: no double count
    meter.hold(kept)
    meter.hold(kept[10:20])  # a view of a held storage
    assert meter.current == saved + kept.untyped_storage().nbytes()
    meter.release(kept[10:20])
    meter.release(kept)
    meter.release(x)
    assert meter.current == saved
    del y


def test_live_bytes_meter_sees_tensors_autograd_does_not_save_and_their_release():
    from infinipipe.runtime.live_bytes import LiveBytesMeter

    with LiveBytesMeter(torch.device("cpu")) as meter:
        held = torch.ones(1000, dtype=torch.float64)  # held by a reference, not by autograd
        view = held[10:20] * 2
        assert meter.current == 8000 + 80
        del held
        assert meter.current == 80
        del view
    assert meter.current == 0 and meter.peak == 8080


def test_a_gone_host_tiers_slab_address_starting_a_device_tensor_is_counted():
    """Operators' outputs on a host tier's slab are not device bytes; once the tier is gone, the
    allocator may start a device tensor at its slab's address, and that tensor counts (a stale
    address made a step's peak depend on the tiers made before it in the process)."""
    from infinipipe.runtime.live_bytes import LiveBytesMeter
    from infinipipe.runtime.offload import HostTier

    cpu, size = torch.device("cpu"), 1 << 16
    tier = HostTier(cpu, size)
    address = tier.view(tier.take(size), size).data_ptr()
    del tier
    with LiveBytesMeter(cpu) as meter:
        made = [torch.empty(size, dtype=torch.uint8) for _ in range(8)]
        assert meter.current == len(made) * size
    if all(t.data_ptr() != address for t in made):
        pytest.skip("the allocator started no tensor at the slab's address")
