//! capsa-vm-pool (under construction).
