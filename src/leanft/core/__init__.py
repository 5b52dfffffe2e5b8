"""The library: PaCA (and its 4-bit layer), DropBP with allocation and fidelity, block discovery, the chunked loss,
distributed helpers. Imports nothing from ``leanft.run`` or ``leanft.studies``."""
