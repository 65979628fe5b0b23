//! loadtests (in progress)
