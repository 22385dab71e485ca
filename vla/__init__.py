"""vla — vision-language alignment curricula as staged, reproducible commands."""

__version__ = "0.1.0"
