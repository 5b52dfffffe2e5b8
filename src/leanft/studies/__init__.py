"""The studies: ``leanft bench`` with its worker, ``leanft compare``, ``leanft fidelity``, their reports and plots."""
