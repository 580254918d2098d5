"""Contexts from the data set a sample comes from (source / target in domain adaptation)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Union

import torch

from .base import ContextSource


class DomainContexts(ContextSource):
    """One context per domain: every sample of domain d gets id d.

    Args:
        domains: the domain names, in id order (e.g. ["mnist", "svhn"]).

    The domain is known at test time, so ids are not label-derived.
    """

    kind = "domain"
    input_keys = ("domain",)

    def __init__(self, domains: Sequence[str]) -> None:
        super().__init__()
        self.domains = [str(domain) for domain in domains]
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be distinct names, at least one, got {list(domains)}.")

    @property
    def num_contexts(self) -> int:
        return len(self.domains)

    def index(self, domain: Union[str, int]) -> int:
        if isinstance(domain, int) and 0 <= domain < self.num_contexts:
            return domain
        if domain in self.domains:
            return self.domains.index(domain)
        raise ValueError(f"Unknown domain {domain!r}; this source knows {self.domains}.")

    def fit(self, sizes: Mapping[str, int]) -> "DomainContexts":
        """Priors = each domain's share of the training samples, from {domain: number of samples}."""
        counts = torch.zeros(self.num_contexts, dtype=torch.float64)
        for domain, size in sizes.items():
            counts[self.index(domain)] = float(size)
        if (counts < 0).any() or counts.sum() <= 0:
            raise ValueError(f"domain sizes must be non-negative and not all zero, got {dict(sizes)}.")
        self._priors = (counts / counts.sum()).float()
        return self

    def assign(self, domain: Union[str, int, Sequence[Union[str, int]]], num_samples: int = 1) -> torch.Tensor:
        """Ids of ``num_samples`` samples of one domain, or of a sequence of per-sample domains."""
        self._check_fitted()
        if isinstance(domain, (str, int)):
            return torch.full((num_samples,), self.index(domain), dtype=torch.long)
        if isinstance(domain, torch.Tensor):
            domain = domain.tolist()
        return torch.tensor([self.index(d) for d in domain], dtype=torch.long)

    def _config(self) -> Dict[str, Any]:
        return {"domains": self.domains}

    @classmethod
    def _from_saved(cls, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "DomainContexts":
        return cls(config["domains"])
