//! The libvirt provider: domains, volumes and networks labelled with the cluster ID in libvirt metadata.
