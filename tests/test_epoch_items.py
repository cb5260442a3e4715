"""max_train_items: an epoch draws at most that many training items, another draw each epoch, and
the option enters the fingerprint only when set (folders made before it still resume)."""

from local.batch import GlobalBatchSampler

from conftest import RECIPE  # noqa: F401


def test_an_epoch_draws_at_most_max_items_and_each_epoch_another_draw():
    full = GlobalBatchSampler(100, 8, seed=3)
    capped = GlobalBatchSampler(100, 8, seed=3, max_items=30)
    assert len(full) == 13 and len(capped) == 4
    drawn = []
    for epoch in (1, 2):
        capped.set_epoch(epoch)
        full.set_epoch(epoch)
        items = [i for batch in capped for i in batch]
        assert len(items) == 30 and len(set(items)) == 30
        # the first items of the same permutation as the uncapped sampler's
        assert items == [i for batch in full for i in batch][:30]
        drawn.append(set(items))
    assert drawn[0] != drawn[1]
    assert len(GlobalBatchSampler(10, 8, seed=3, max_items=500)) == 2  # a cap above the items: all


def test_the_option_enters_the_fingerprint_only_when_set():
    from local.fingerprint import option_fingerprint
    from local.options import check_value

    base = {"seed": 1, "batch_size": 8, "max_train_items": None}
    assert "max_train_items" not in option_fingerprint(base, ["F02"])["options"]
    assert option_fingerprint({**base, "max_train_items": 50}, ["F02"])["options"]["max_train_items"] == 50
    assert (
        check_value("max_train_items", 0)
        == "--max_train_items=0 is not allowed: max_train_items must be null or an integer >= 1"
    )
    assert check_value("max_train_items", None) is None
