"""Running a compiled net: `Net` (one arena per device, the torch or triton backend), its weights,
and one partition per process under torch.distributed."""
