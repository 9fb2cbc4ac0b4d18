"""Deferred moving-statistics updates: tf.GraphKeys.UPDATE_OPS, eagerly.

By default (``updates_collections=cubn.UPDATE_OPS``) a training call of a
batch-norm layer does *not* update ``moving_mean``/``moving_variance``: it
appends the update, as a callable, to the collection, exactly where TF put
its update ops. Nothing runs them unless you do -- ``cubn.run_updates()``
after the optimizer step, as ``tf.control_dependencies(update_ops)`` did.
Forgetting it is the famous trap: the moving statistics never move and
inference is wrong. ``updates_collections=None`` applies the update inside
the forward call instead.
"""
from __future__ import annotations


class UpdateCollection(list):
    """A list of pending update callables (what ``tf.get_collection(UPDATE_OPS)`` returned)."""

    def __init__(self, name: str = "update_ops"):
        super().__init__()
        self.name = name

    def __repr__(self) -> str:
        return f"<UpdateCollection {self.name!r}: {len(self)} pending>"


UPDATE_OPS = UpdateCollection("update_ops")


def run_updates(collection=None) -> int:
    """Run and remove every pending update in ``collection`` (default ``UPDATE_OPS``), in order.

    Returns how many ran. Updates read the moving statistics as they are when
    they run, as TF's update ops read their variables when executed.
    """
    coll = UPDATE_OPS if collection is None else collection
    n = 0
    while True:
        try:  # pop, not len-then-pop: another thread may be draining the same collection
            update = coll.pop(0)
        except IndexError:
            return n
        update()
        n += 1
