"""Deferred moving-statistics updates: tf.GraphKeys.UPDATE_OPS, eagerly.

By default (``updates_collections=cubn.UPDATE_OPS``) a training call of a
batch-norm layer does *not* update ``moving_mean``/``moving_variance``: it
appends the update, as a callable, to the collection, exactly where TF put
its update ops. Nothing runs them unless you do -- ``cubn.run_updates()``
after the optimizer step, as ``tf.control_dependencies(update_ops)`` did.
Forgetting it is the famous trap: the moving statistics never move and
inference is wrong. ``updates_collections=None`` applies the update inside
the forward call instead.

Collections are named by strings, as in TensorFlow: ``"update_ops"`` (the
value of ``tf.GraphKeys.UPDATE_OPS``) *is* ``cubn.UPDATE_OPS``, and any other
name gets its own [`UpdateCollection`][UpdateCollection] on first use
(`get_collection`).
"""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel that points at the first caller outside cubn.

    Call it in the function that calls ``warnings.warn`` (level 1 is that function).
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


class PendingUpdatesWarning(UserWarning):
    """Moving-statistics updates pile up in a collection nobody runs."""


class UpdateCollection(list):
    """A list of pending update callables (what ``tf.get_collection(UPDATE_OPS)`` returned).

    Appending the ``warn_after + 1``-th pending update warns
    ([`PendingUpdatesWarning`][PendingUpdatesWarning]): a training loop that never calls
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
                PendingUpdatesWarning, stacklevel=user_stacklevel())

    def __repr__(self) -> str:
        return f"<UpdateCollection {self.name!r}: {len(self)} pending>"

    def __reduce__(self):
        # UPDATE_OPS is one per process: a pickled or copied layer keeps
        # sending its updates to it, as the original did.
        if self is UPDATE_OPS:
            return "UPDATE_OPS"
        return super().__reduce__()


UPDATE_OPS = UpdateCollection("update_ops")

# name -> collection; "update_ops" is UPDATE_OPS for the life of the process.
_named: dict = {"update_ops": UPDATE_OPS}


def get_collection(name: str) -> list:
    """The collection called ``name`` (created empty on first use); ``"update_ops"`` is ``UPDATE_OPS``."""
    coll = _named.get(name)
    if coll is None:
        coll = _named[name] = UpdateCollection(name)
    return coll


def resolve(spec) -> list:
    """An ``updates_collections`` value -> the lists the updates go to.

    A name, a list/tuple of names (the update goes to each, as TF's
    ``add_to_collections``), or a list-like object used as the collection.
    """
    if isinstance(spec, str):
        return [get_collection(spec)]
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        return [get_collection(s) for s in dict.fromkeys(spec)]
    return [spec]


def is_collection_spec(spec) -> bool:
    """What ``updates_collections`` accepts besides None: a name, names, or an object with ``append``."""
    if isinstance(spec, str):
        return bool(spec)
    if isinstance(spec, tuple):
        return bool(spec) and all(isinstance(s, str) and s for s in spec)
    return hasattr(spec, "append") and hasattr(spec, "pop")


def clear_named() -> None:
    """Empty every named collection (``UPDATE_OPS`` stays the same object)."""
    for coll in _named.values():
        coll.clear()


def warn_if_pending(layer, spec) -> None:
    """Warn when ``layer`` runs inference while its own updates wait in its collections.

    ``spec`` is the layer's ``updates_collections`` (None: in place, nothing
    waits). A pending update says whether it is the layer's by ``belongs_to(layer)``.
    """
    if spec is None:
        return
    for collection in resolve(spec):
        _warn_if_pending_in(layer, collection)


def _not_any(layer) -> bool:
    return False


def _warn_if_pending_in(layer, collection) -> None:
    if not collection:
        return
    n = sum(1 for u in collection if getattr(u, "belongs_to", _not_any)(layer))
    if n:
        name = getattr(collection, "name", None)
        where = "cubn.UPDATE_OPS" if collection is UPDATE_OPS else (f"collection {name!r}" if name else "its collection")
        warnings.warn(
            f"{layer!r} is called with is_training=False while {n} of its moving-statistics update(s) wait in "
            f"{where}: inference uses moving statistics without them. Run cubn.run_updates() after each "
            "training step, or build the layer with updates_collections=None",
            PendingUpdatesWarning, stacklevel=user_stacklevel())


def run_updates(collection=None) -> int:
    """Run and remove every pending update in ``collection`` (default ``UPDATE_OPS``), in order.

    ``collection`` may be a list-like object or a collection name
    (``"update_ops"`` is ``UPDATE_OPS``). Returns how many ran. Updates read
    the moving statistics as they are when they run, as TF's update ops read
    their variables when executed.
    """
    if collection is None:
        coll = UPDATE_OPS
    elif isinstance(collection, str):
        coll = get_collection(collection)
    else:
        coll = collection
    n = 0
    while True:
        try:  # pop, not len-then-pop: another thread may be draining the same collection
            update = coll.pop(0)
        except IndexError:
            return n
        update()
        n += 1
