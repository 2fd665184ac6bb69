"""The lab: CSULoRA's experiments, apart from the product (``csulora`` never imports this package).

- ``synthetic/``: the paper's experiment in miniature, built locally and seeded (``csulora lab``);
- ``smollm2/``: the real-model study on SmolLM2-135M-Instruct (``csulora lab --world smollm2``);
- shared: ``train`` (the prompt format, training loops), ``sweep`` (the methods' roles and grids, the
  corrections), ``gates``, ``machine``, and ``cli`` (the ``lab`` command, added to ``csulora`` through
  the ``csulora.commands`` entry point: ``plugin.register``).
"""
