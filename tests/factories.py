import factory
from factory.django import DjangoModelFactory

from chat.models import Conversation, Message, Run
from tenants.models import Membership, Role, Tenant, User
from tenants.rls import operator_scope

PASSWORD = "correct-horse-battery"


class ScopedFactory(DjangoModelFactory):
    """Creates rows as the platform would for a test's setup: past row level security."""

    class Meta:
        abstract = True

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        with operator_scope():
            return super()._create(model_class, *args, **kwargs)


class TenantFactory(ScopedFactory):
    class Meta:
        model = Tenant

    name = factory.Sequence(lambda n: f"Company {n}")
    slug = factory.Sequence(lambda n: f"company-{n}")


class UserFactory(DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def _save(obj, create, extracted, **kwargs):
        if create:
            obj.save()


class MembershipFactory(ScopedFactory):
    class Meta:
        model = Membership

    tenant = factory.SubFactory(TenantFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.MEMBER


class ConversationFactory(ScopedFactory):
    """A conversation of `user` in `tenant` (pass both: a member's, as the app makes them)."""

    class Meta:
        model = Conversation

    tenant = factory.SubFactory(TenantFactory)
    user = factory.SubFactory(UserFactory)
    title = factory.Sequence(lambda n: f"Conversation {n}")


class MessageFactory(ScopedFactory):
    """A message of `conversation` (in its tenant), by default the user's. Given a
    `parent`, it goes in the parent's conversation: `MessageFactory(parent=question,
    role=Message.Role.ASSISTANT, content=...)` is an answer."""

    class Meta:
        model = Message

    parent = None
    conversation = factory.Maybe(
        "parent",
        yes_declaration=factory.SelfAttribute("parent.conversation"),
        no_declaration=factory.SubFactory(ConversationFactory),
    )
    tenant = factory.SelfAttribute("conversation.tenant")
    role = Message.Role.USER
    content = "Say something."


class RunFactory(ScopedFactory):
    """A run answering `user_message`, in its conversation, for its conversation's user;
    queued unless `state` says otherwise."""

    class Meta:
        model = Run

    user_message = factory.SubFactory(MessageFactory)
    conversation = factory.SelfAttribute("user_message.conversation")
    tenant = factory.SelfAttribute("conversation.tenant")
    user = factory.SelfAttribute("conversation.user")


def tool_step(call_id, name, arguments=None, *, result=None, error=None, truncated=False):
    """One stored tool call of an agent's answer (`Message.steps`)."""
    return {
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "result": result,
        "error": error,
        "truncated": truncated,
    }
