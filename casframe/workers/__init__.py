"""Local work on every core: helper processes of casframe's own for import and checkout.

See :mod:`casframe.workers.pool` for the runners, :mod:`casframe.workers.worker` for the
helper program and :mod:`casframe.workers.protocol` for what crosses their pipes. This package
must never import the modules whose work it runs (tree, checkout) except in the helper program
itself, so that they can import it.
"""
