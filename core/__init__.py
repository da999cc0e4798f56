"""The vocabulary every Tandem package shares: domain errors, atomic files, external programs."""
