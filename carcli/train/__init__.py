"""Joint training of the resampler and SR networks (section 4 of the method)."""
