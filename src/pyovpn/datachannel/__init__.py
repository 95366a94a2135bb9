"""Data-channel offload: the command interface (:mod:`.api`) and its backends."""
