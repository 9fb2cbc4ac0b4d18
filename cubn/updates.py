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

import warnings


class PendingUpdatesWarning(UserWarning):
    """Moving-statistics updates pile up in a collection nobody runs."""


class UpdateCollection(list):
    """A list of pending update callables (what ``tf.get_collection(UPDATE_OPS)`` returned).

    Appending the ``warn_after + 1``-th pending update warns
    (:class:`PendingUpdatesWarning`): a training loop that never calls
    ``cubn.run_updates()`` grows it by one update per layer per step.
    ``warn_after = None`` turns the warning off.
    """

    warn_after = 500

    def __init__(self, name: str = "update_ops"):
        super().__init__()
        self.name = name

    def append(self, update) -> None:
        super().append(update)
        if self.warn_after is not None and len(self) == self.warn_after + 1:
            warnings.warn(
                f"{self!r}: more than {self.warn_after} moving-statistics updates are pending and none has "
                "run, so the moving statistics have not moved. Call cubn.run_updates() after each training "
                "step, or build the layers with updates_collections=None to update in place",
                PendingUpdatesWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"<UpdateCollection {self.name!r}: {len(self)} pending>"

    def __reduce__(self):
        # UPDATE_OPS is one per process: a pickled or copied layer keeps
        # sending its updates to it, as the original did.
        if self is UPDATE_OPS:
            return "UPDATE_OPS"
        return super().__reduce__()


UPDATE_OPS = UpdateCollection("update_ops")


def warn_if_pending(layer, collection) -> None:
    """Warn when ``layer`` runs inference while its own updates wait in ``collection``.

    Pending updates expose the layer they update as ``.layer``.
    """
    if not collection:
        return
    n = sum(1 for u in collection if getattr(u, "layer", None) is layer)
    if n:
        name = getattr(collection, "name", None)
        where = "cubn.UPDATE_OPS" if collection is UPDATE_OPS else (f"collection {name!r}" if name else "its collection")
        warnings.warn(
            f"{layer!r} is called with is_training=False while {n} of its moving-statistics update(s) wait in "
            f"{where}: inference uses moving statistics without them. Run cubn.run_updates() after each "
            "training step, or build the layer with updates_collections=None",
            PendingUpdatesWarning, stacklevel=3)


def run_updates(collection=None) -> int:
    """Run and remove every pending update in ``collection`` (default ``UPDATE_OPS``), in order.

    Returns how many ran. Updates read the moving statistics as they are when
    they run, as TF's update ops read their variables when executed.
    """
    coll = UPDATE_OPS if collection is None else collection
    n = 0
    while len(coll):
        update = coll.pop(0)
        update()
        n += 1
    return n
