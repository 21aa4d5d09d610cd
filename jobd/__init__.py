"""jobd: the job daemon that research software containers are shipped with."""

__version__ = "0.1.0"
