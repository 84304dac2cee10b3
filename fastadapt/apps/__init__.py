"""fastadapt's applications, built on the public API; the library never imports this package.

* :mod:`fastadapt.apps.cli` -- the command line (``fastadapt`` / ``python -m fastadapt``),
* :mod:`fastadapt.apps.demo` -- ``demo``: the seed comparison of AdaGrad, RMSprop and Adam,
* :mod:`fastadapt.apps.recsys` -- ``recsys``: BPR matrix factorisation with sparse steps,
* :mod:`fastadapt.apps.benchmark` -- ``bench``: dense-step GB/s against the streaming ceiling
  and torch.optim (also the helpers of the repository's ``bench/`` suites),
* :mod:`fastadapt.apps.progress` -- the progress line they share.

These modules use ``import fastadapt as fa`` (the optimizers, :class:`fastadapt.RowGrad`,
:mod:`fastadapt.functional`) and nothing internal.
"""
