"""Version strings."""

__version__ = "0.1.0"

#: Written as ``peft_version`` in ``adapter_config.json``: the PEFT file format we write (PEFT 0.21.2),
#: with our own version as a PEP 440 local label, so PEFT's tooling can still parse it.
FORMAT_VERSION = f"0.21.2+fourierft.{__version__}"
