"""Each stage's P2P posts, played under NCCL's rules (whole groups, groups in posting order), end
for every order a planner makes or a validator accepts; posting by actions alone does not."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from chunking import random_chunks, sequential_plan, timed_plan, with_weight_actions
from infinipipe.contract.ir import Action, Chunk, Plan, Segment, validate_plan
from infinipipe.contract.model_config import ModelConfig
from infinipipe.planners.schedule import Order, epp_schedule
from infinipipe.runtime.p2p_order import Transfer, input_of, nccl_hang, output_of, stage_posts, transfer_order

CFG = ModelConfig(vocab_size=97, hidden=32, layers=8, heads=4, kv_heads=2, ffn=64)


def _layers(stages: int) -> list[int]:
    layers = [CFG.layers // stages] * stages
    layers[-1] += CFG.layers - sum(layers)
    return layers


def _random_interleaving(plan: Plan, rng: random.Random) -> Plan:
    """The plan's forward and backward orders, each stage merging them its own random way: a
    random play in which a random stage runs its next forward or backward whose input is there."""
    n = plan.num_stages
    queues = [[[a for a in plan.stage_actions[0] if a.kind == kind] for kind in "FB"] for _ in range(n)]
    done: set[tuple[str, int, int]] = set()
    stages: list[list[Action]] = [[] for _ in range(n)]
    while any(q for qs in queues for q in qs):
        ready = [(s, q) for s in range(n) for q in queues[s]
                 if q and (input_of(q[0], s, n) is None or (q[0].kind, input_of(q[0], s, n).src, q[0].chunk_id) in done)
                 and (q[0].kind == "F" or ("F", s, q[0].chunk_id) in done)]
        s, q = rng.choice(ready)
        a = q.pop(0)
        done.add((a.kind, s, a.chunk_id))
        stages[s].append(a)
    return Plan(plan.seq_lengths, plan.chunks, tuple(map(tuple, stages)), plan.layers_per_stage, plan.pipelines)


def _plan(kind: str, seed: int, stages: int) -> Plan:
    rng = random.Random(seed)
    lengths = [rng.randint(2, 60) for _ in range(rng.randint(1, 7))]
    chunks = random_chunks(lengths, rng)
    layers = _layers(stages)
    if kind == "timed":
        return timed_plan(chunks, lengths, layers, CFG, lambda s, c: 0, rng)
    if kind == "sequential":
        return sequential_plan(chunks, lengths, layers)
    plan = epp_schedule(chunks, lengths, stages, layers, None,
                        order=Order("interleaved") if kind == "interleaved" else Order())
    if kind == "1f1b+W":
        return with_weight_actions(plan, rng)
    if kind == "random":
        plan = _random_interleaving(plan, rng)
        validate_plan(plan)
    return plan


@settings(max_examples=120, deadline=None)
@given(kind=st.sampled_from(["1f1b", "1f1b+W", "interleaved", "timed", "sequential", "random"]),
       seed=st.integers(0, 10**6), stages=st.integers(1, 6), lookahead=st.integers(0, 3))
def test_no_order_hangs_under_nccl_rules(kind, seed, stages, lookahead):
    plan = _plan(kind, seed, stages)
    posts = [stage_posts(plan, s, lookahead) for s in range(plan.num_stages)]
    assert nccl_hang(plan, posts) is None


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), stages=st.integers(2, 5), lookahead=st.integers(0, 3))
def test_each_transfer_is_posted_once_at_each_end_and_a_send_only_after_its_compute(seed, stages, lookahead):
    plan = _plan("timed", seed, stages)
    everything = transfer_order(plan)
    assert len(everything) == len(set(everything))
    for s, actions in enumerate(plan.stage_actions):
        posts = stage_posts(plan, s, lookahead)
        flat = [t for group in posts for t in group]
        assert flat == [t for t in everything if s in (t.src, t.dst)]
        for i, group in enumerate(posts):
            computed = {output_of(a, s, plan.num_stages) for a in actions[:i]}
            assert all(t in computed for t in group if t.src == s)
        posted_by = {t: i for i, group in enumerate(posts) for t in group}
        for i, a in enumerate(actions):
            need = input_of(a, s, plan.num_stages)
            assert need is None or posted_by[need] <= i


def _by_actions(plan: Plan, stage: int, lookahead: int = 1) -> list[tuple[Transfer, ...]]:
    """Posting by action count: before each action, the last action's send and the receives of the
    next ``lookahead`` input-needing actions, whatever the neighbours' queues hold."""
    n = plan.num_stages
    actions = plan.stage_actions[stage]
    needing = [i for i, a in enumerate(actions) if input_of(a, stage, n) is not None]
    posts, posted = [], 0
    for i in range(len(actions) + 1):
        group = [t for t in [output_of(actions[i - 1], stage, n)] if t is not None] if i else []
        due = min(sum(j <= i for j in needing) + lookahead, len(needing)) if i < len(actions) else posted
        group += [input_of(actions[j], stage, n) for j in needing[posted:due]]
        posted = max(posted, due)
        posts.append(tuple(group))
    return posts


def test_posting_by_action_count_hangs_under_nccl_rules():
    """Stage 0 posts its first backward's receive before its first forward's send: under NCCL the
    send's group waits behind the receive, whose gradient needs that send."""
    plan = _plan("1f1b", 0, 2)
    assert nccl_hang(plan, [_by_actions(plan, s) for s in range(2)]) is not None
    assert nccl_hang(plan, [stage_posts(plan, s) for s in range(2)]) is None


def test_a_receive_never_posted_is_reported():
    plan = _plan("1f1b", 1, 2)
    posts = [stage_posts(plan, s) for s in range(2)]
    last = [tuple(t for t in group if t.dst != 1) for group in posts[1]]
    assert "never posted" in nccl_hang(plan, [posts[0], last])


def test_a_middle_stage_running_a_chunk_down_and_back_posts_its_send_first():
    """Every stage runs each chunk's forward and then at once its backward: a middle stage's
    receive of that gradient cannot go ahead of its send of the activation."""
    chunks = (Chunk(0, (Segment(0, 0, 4),)), Chunk(1, (Segment(1, 0, 4),)))
    acts = tuple(Action(kind, c.id) for c in chunks for kind in "FB")
    plan = Plan((4, 4), chunks, (acts,) * 3, tuple(_layers(3)))
    validate_plan(plan)
    where = {t: i for i, group in enumerate(stage_posts(plan, 1, 3)) for t in group}
    assert where[Transfer("act", 0, 1, 2)] <= where[Transfer("grad", 0, 2, 1)]
    assert nccl_hang(plan, [stage_posts(plan, s, 3) for s in range(3)]) is None
    assert nccl_hang(plan, [_by_actions(plan, s, 3) for s in range(3)]) is not None
