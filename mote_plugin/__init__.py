"""MoTE (MoE Tucker Editor): closed-form knowledge editing for Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
