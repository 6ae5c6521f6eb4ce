"""Expert demonstrations for HPO: the ExpertSource interface, oracle experts, (later) SED."""
