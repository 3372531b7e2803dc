"""Campaign specs, cells and plans."""

from infscale.campaign.cell import Cell
from infscale.campaign.layout import Layout
from infscale.campaign.spec import Campaign, CampaignSpec, SpecError, campaign_from_dict, load_campaign

__all__ = ["Campaign", "CampaignSpec", "Cell", "Layout", "SpecError", "campaign_from_dict", "load_campaign"]
