"""How tensors travel: LocalSGD on torch.distributed, the stacked simulator, their communicators and guards."""
