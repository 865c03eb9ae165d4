"""Pure policy code: no I/O and no imports from felixpy. Today: Calico's selector language."""
