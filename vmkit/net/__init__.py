"""Network drivers: netlink links and taps (links), nftables tables (nft), and their peers (dnsmasq, OVS)."""
