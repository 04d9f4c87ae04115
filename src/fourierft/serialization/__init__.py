"""Everything that reads or writes adapter files, in one place; nothing here imports ``peft_model``.

Where a file comes from (a local folder, or the Hugging Face Hub and its cache) is :mod:`fourierft.hub`,
one floor lower: ``config`` reads files through it too, and this package imports ``config``.

* :mod:`~fourierft.serialization.tensors`: weights files (safetensors or weights-only ``torch.save``) and
  their checksum.
* :mod:`~fourierft.serialization.state_dict`: an adapter's tensors under PEFT's file keys, strict loading,
  the legacy-file rule and the fingerprint of the derived tensors.
* :mod:`~fourierft.serialization.folders`: adapter folders (PEFT's layout), atomic saving, reading a
  config and a weights file.
* :mod:`~fourierft.serialization.modelcard`: the ``README.md`` written beside saved adapters.

Data flows one way: ``peft_model`` calls into this package; this package sees a model only through its
public attributes (``peft_config``, ``get_base_model``, the adapter layers).
"""
